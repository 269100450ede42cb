"""Calibration of predict's domain checks (segadapt.inference.domain) on real data: every held-out scan of a shipped
dataset passes the model trained on the rest of it without a warning, and every mismatched pair in the shared
data gets the intensity-histogram warning (another body region or kind of image)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from monai.transforms import Compose

from segadapt.data import PreprocessConfig, inference_transforms, make_phantom_dataset, write_dataset_json
from segadapt.plan.fingerprint import fingerprint
from segadapt.inference.domain import HISTOGRAM_DISTANCE, TrainingDomain
from segadapt.inference.inputs import dicom_modality

REPO = Path(__file__).resolve().parents[1]
PHANTOM = {"n": 6, "shape": (64, 64, 32), "spacing": (3.45, 3.45, 5.0)}  # configs/data/phantom_*.yaml
HISTOGRAM_WARNING = "intensity histogram unlike the training scans'"


def read(path: Path, spatial_dims: int = 3, channels: int = 1) -> tuple[np.ndarray, list[float]]:
    """An input as predict reads it before checking it (load, orient): (C, *spatial) and its spacing."""
    preprocess = PreprocessConfig(spatial_dims=spatial_dims, orientation="RAS"[:spatial_dims],
                                  intensity="rgb" if channels == 3 else "ct", target_spacing=None,
                                  patch_size=[64] * spatial_dims, slice_size=[64, 64])
    image = Compose(inference_transforms(preprocess, channels).transforms[:2])({"image": str(path), "case_id": "x"})["image"]
    return image.numpy(), [float(s) for s in image.pixdim]


@pytest.fixture(scope="module")
def datasets(shared_data, tmp_path_factory) -> dict[str, tuple[dict, int, int]]:
    """name -> (fingerprint of every case, spatial dims, channels) of the shipped datasets."""
    root = tmp_path_factory.mktemp("calibration")
    found = {}
    for domain in ("sah", "tbi"):
        dataset = make_phantom_dataset(root / domain, domain, PHANTOM["n"], 0, PHANTOM["shape"], PHANTOM["spacing"])
        found[f"phantom_{domain}"] = (fingerprint(dataset), 3, 1)
    hippocampus = shared_data / "hippocampus_msd"
    cases = [{"image": str(i), "label": str(hippocampus / "labelsTr" / i.name), "case_id": i.name.split(".")[0]}
             for i in sorted((hippocampus / "imagesTr").glob("*.nii.gz")) if (hippocampus / "labelsTr" / i.name).is_file()]
    dataset = write_dataset_json(root / "hippocampus" / "dataset.json", "hippocampus", cases,
                                 {0: "background", 1: "anterior", 2: "posterior"}, {0: "MRI"})
    found["hippocampus"] = (fingerprint(dataset), 3, 1)
    drive = root / "DRIVE"
    for subset in ("training", "test"):
        (drive / subset).mkdir(parents=True)
        for folder in ("images", "1st_manual"):
            (drive / subset / folder).symlink_to(shared_data / "drive" / subset / folder, target_is_directory=True)
    spec = importlib.util.spec_from_file_location("prepare_drive", REPO / "datasets" / "prepare_drive.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    dataset = prepare.main(["--root", str(drive), "--out", str(root / "drive")])
    found["drive"] = (fingerprint(dataset, spatial_dims=2), 2, 3)
    return found


def held_out(fp: dict, index: int) -> TrainingDomain:
    """The domain of a model trained on every case of `fp` but case `index`."""
    return TrainingDomain.from_fingerprint({**fp, "cases": fp["cases"][:index] + fp["cases"][index + 1:]})


@pytest.mark.parametrize("name", ["phantom_sah", "phantom_tbi", "hippocampus", "drive"])
def test_held_out_scans_of_each_dataset_never_warn(name, datasets):
    from segadapt.data import load_dataset_json

    fp, dims, channels = datasets[name]
    description = load_dataset_json(fp["dataset_json"])
    scores = []
    for index, case in enumerate(description.cases):
        domain = held_out(fp, index)
        image, spacing = read(case.image, dims, channels)
        assert domain.check(image, spacing) == [], case.image
        scores.append(domain.histogram_distance(image))
    print(f"{name}: held-out histogram distance max {max(scores):.3f}, median {np.median(scores):.3f}")
    assert max(scores) < HISTOGRAM_DISTANCE


@pytest.mark.parametrize("domain", ["sah", "tbi"])
def test_new_phantom_heads_pass_a_model_trained_on_two(domain, tmp_path):
    """The demo's case (make_demo_runs: each fold trains on 2 phantoms): ten heads of another seed pass it."""
    from segadapt.data import load_dataset_json

    shape, spacing = (40, 40, 20), (5.5, 5.5, 8.0)
    fp = fingerprint(make_phantom_dataset(tmp_path / "train", domain, 2, 0, shape, spacing))
    domain_ = TrainingDomain.from_fingerprint(fp)
    for case in load_dataset_json(make_phantom_dataset(tmp_path / "new", domain, 10, 12345, shape, spacing)).cases:
        image, spacing_ = read(case.image)
        assert domain_.check(image, spacing_) == [], case.image


# (input under the shared data folder, the dataset whose model it is given to)
MISMATCHED = [
    ("ct_abdomen_totalseg/ct.nii.gz", "phantom_sah"),       # abdomen CT into the head-CT model
    ("ct_abdomen_totalseg/ct.nii.gz", "phantom_tbi"),
    ("ct_abdomen_totalseg/ct_large.nii.gz", "phantom_sah"),
    ("ct_abdomen_totalseg/ct_dicom", "phantom_sah"),
    ("hippocampus_msd/imagesTr/hippocampus_001.nii.gz", "phantom_sah"),  # MRI into the CT model
    ("hippocampus_msd/dicom_hcrop", "phantom_sah"),
    ("phantom_sah", "hippocampus"),                           # the phantom CT into the hippocampus model
    ("phantom_tbi", "hippocampus"),
    ("ct_abdomen_totalseg/ct.nii.gz", "hippocampus"),
    ("ct_abdomen_totalseg/ct_dicom", "hippocampus"),
]


@pytest.mark.parametrize("scan, model", MISMATCHED)
def test_mismatched_pairs_always_warn(scan, model, datasets, shared_data):
    fp, _, _ = datasets[model]
    if scan in datasets:  # every case of another shipped dataset
        from segadapt.data import load_dataset_json

        paths = [Path(c.image) for c in load_dataset_json(datasets[scan][0]["dataset_json"]).cases]
    else:
        paths = [shared_data / scan]
    domain = TrainingDomain.from_fingerprint(fp)
    for path in paths:
        image, spacing = read(path)
        found = domain.check(image, spacing, dicom_modality(path) if path.is_dir() else None)
        distance = domain.histogram_distance(image)
        print(f"{path.name} -> {model}: histogram distance {distance:.3f}")
        assert distance > HISTOGRAM_DISTANCE and any(m.startswith(HISTOGRAM_WARNING) for m in found), (path, found)


def test_an_old_fingerprint_without_quantiles_loads_and_skips_the_histogram_check(datasets, shared_data):
    fp, _, _ = datasets["phantom_sah"]
    old = {**{k: v for k, v in fp.items() if k != "quantile_levels"},
           "cases": [{k: v for k, v in c.items() if k != "image_quantiles"} for c in fp["cases"]]}
    domain = TrainingDomain.from_fingerprint(old)
    image, spacing = read(shared_data / "ct_abdomen_totalseg" / "ct.nii.gz")
    assert domain.histogram_distance(image) is None
    assert not any(m.startswith(HISTOGRAM_WARNING) for m in domain.check(image, spacing))
