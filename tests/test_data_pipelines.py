"""The one preprocessing spec: the MONAI bundle's preprocessing (the spec written as JSON, built by MONAI's
ConfigParser as ``monai.bundle`` builds it) gives the arrays training and ``segadapt predict`` give, on a phantom
scan and on real CT and MRI volumes; segadapt's array transforms compute their formulas and are what their
dictionary transforms apply."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from segadapt.data import (CTWindow, CTWindowd, CTZScore, CTZScored, PreprocessConfig, ZScore, ZScored,
                           inference_transforms, make_phantom_dataset, preprocessing_spec, val_transforms)
from segadapt.export.bundle import preprocessing

CT = {
    "windows": {},  # three HU windows stacked as channels (CTWindowd), foreground crop
    "one_window_resampled": {"windows": [[40.0, 80.0]], "target_spacing": [4.0, 4.0, 5.0]},
    "ct_zscore": {"intensity": "ct_zscore", "clip_range": [[-160.0, 240.0]], "norm_mean": [40.0], "norm_std": [60.0],
                  "target_spacing": [4.0, 4.0, 4.0]},
}
MRI = {
    "mri": {"intensity": "mri"},
    "zscore": {"intensity": "zscore"},  # no background value: MONAI's NormalizeIntensityd, no crop
    "zscore_background_resampled": {"intensity": "zscore", "background_value": [0.0], "target_spacing": [1.5, 1.5, 1.5]},
}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("phantom")
    make_phantom_dataset(root, "sah", 1, 0, (24, 24, 16), [220 / 24, 220 / 24, 10.0])
    return next((root / "imagesTr").glob("*.nii.gz")), next((root / "labelsTr").glob("*.nii.gz"))


def _same_arrays(image: Path, label: Path, preprocess: dict, label_values: tuple[int, ...]) -> torch.Tensor:
    """Assert the bundle's, the predict and the training (validation) pipelines give one array and grid."""
    cfg = PreprocessConfig(**preprocess)
    bundle = ConfigParser({"preprocessing": preprocessing(cfg, 1)}).get_parsed_content("preprocessing")
    theirs = bundle({"image": str(image)})["image"]
    ours = inference_transforms(cfg, 1)({"image": str(image), "case_id": "c"})["image"]
    training = val_transforms(cfg, label_values)({"image": str(image), "label": str(label), "case_id": "c"})
    for other in (ours, training["image"]):
        assert theirs.shape == other.shape and theirs.dtype == other.dtype == torch.float32
        torch.testing.assert_close(theirs.as_tensor(), other.as_tensor(), atol=0, rtol=0)
        torch.testing.assert_close(theirs.affine, other.affine, atol=0, rtol=0)
    assert training["label"].shape[1:] == theirs.shape[1:]
    return theirs


@pytest.mark.parametrize("name", CT)
def test_bundle_and_training_preprocess_a_phantom_scan_identically(name, phantom):
    image = _same_arrays(*phantom, CT[name], (0, 1))
    assert image.std() > 0


@pytest.mark.parametrize("name", CT)
def test_bundle_and_training_preprocess_a_real_ct_identically(name, shared_data):
    folder = shared_data / "ct_abdomen_totalseg"
    labels = tuple(range(int(np.asarray(nib.load(folder / "seg_total.nii.gz").dataobj).max()) + 1))
    image = _same_arrays(folder / "ct.nii.gz", folder / "seg_total.nii.gz", CT[name], labels)
    assert image.std() > 0


@pytest.mark.parametrize("name", MRI)
def test_bundle_and_training_preprocess_a_real_mri_identically(name, shared_data):
    folder = shared_data / "hippocampus_msd"
    image = _same_arrays(folder / "imagesTr" / "hippocampus_001.nii.gz", folder / "labelsTr" / "hippocampus_001.nii.gz",
                         MRI[name], (0, 1, 2))
    assert image.std() > 0


def test_the_spec_is_json_and_the_bundle_differs_only_in_reading_and_checks():
    """Every branch's spec survives JSON unchanged (what the bundle writes is what training instantiates); the
    bundle's form swaps segadapt's checked reader for MONAI's LoadImaged and drops the foreground check."""
    for preprocess in [*CT.values(), *MRI.values(), {"intensity": "rgb"}, {"spatial_dims": 2, "orientation": "RA", "patch_size": [32, 32], "intensity": "rgb"},
                       {"intensity": "zscore", "background_value": [0.0, None]}]:
        cfg = PreprocessConfig(**preprocess)
        checked = preprocessing_spec(cfg, ("image",), None, 2)
        bundle = preprocessing_spec(cfg, ("image",), None, 2, checked=False)
        assert json.loads(json.dumps(checked)) == checked
        assert checked[0]["_target_"] == "segadapt.data.loading.LoadCased" and bundle[0]["_target_"] == "LoadImaged"
        assert checked[-1]["_target_"] == "segadapt.data.loading.RequireForegroundd"
        assert checked[1:-1] == bundle[1:]


def test_array_transforms_compute_their_formulas_and_their_dict_twins_apply_them():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(100, 200, (2, 6, 5, 4)).astype(np.float32))
    x[1, :2] = 17.0  # background value of channel 1
    windows = [[40.0, 80.0], [600.0, 2800.0]]
    expected = np.concatenate([np.clip((x.numpy() - (lv - w / 2)) / w, 0, 1) for lv, w in windows])
    cases = [
        (CTWindow(windows), CTWindowd("image", windows), expected),
        (CTZScore([[-100.0, 300.0], [0.0, 50.0]], [100.0, 20.0], [50.0, 10.0]),
         CTZScored("image", [[-100.0, 300.0], [0.0, 50.0]], [100.0, 20.0], [50.0, 10.0]),
         np.stack([(np.clip(x[0].numpy(), -100, 300) - 100) / 50, (np.clip(x[1].numpy(), 0, 50) - 20) / 10])),
    ]
    channel = x[1].numpy()
    kept = channel != 17.0
    zscored = np.where(kept, (channel - channel[kept].mean()) / channel[kept].std(), 0.0)  # population std
    cases.append((ZScore([None, 17.0]), ZScored("image", [None, 17.0]),
                  np.stack([(x[0].numpy() - x[0].numpy().mean()) / x[0].numpy().std(), zscored])))
    for array, dictionary, formula in cases:
        out = array(MetaTensor(x.clone()))
        np.testing.assert_allclose(out.numpy(), formula, atol=1e-5)
        torch.testing.assert_close(dictionary({"image": MetaTensor(x.clone())})["image"].as_tensor(), out.as_tensor(),
                                   atol=0, rtol=0)
