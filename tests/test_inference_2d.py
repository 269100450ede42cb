"""2D predict: a run trained on PNG images predicts PNG (and TIFF, JPEG) images into masks of the input's size
and format, with the lesion area in pixels (image files carry no pixel spacing)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from run_fixtures import fit_scratch_unet
from PIL import Image

from segadapt.data import write_dataset_json
from segadapt.data.files import save_png
from segadapt.inference import Predictor
from segadapt.inference.cli import main

H, W = 24, 40  # not square: a transposed mask would not fit


def spot_image(i: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image (H, W, 3) with a bright spot on a dark red background, and the spot's label (H, W)."""
    image = np.empty((H, W, 3), np.uint8)
    image[:] = (90, 60, 40)
    label = np.zeros((H, W), np.uint8)
    label[6 + i % 3: 14 + i % 3, 20 + i: 32] = 1
    image[label > 0] = (250, 200, 120)
    return image, label


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory) -> Path:
    """A tiny 2D MONAI UNet trained from scratch on four PNG images (DRIVE's layout: RGB PNG, 0/1 PNG labels)."""

    root = tmp_path_factory.mktemp("png_world")
    cases = []
    for i in range(4):
        image, label = spot_image(i)
        cases.append({"case_id": f"s{i}", "image": save_png(root / "imagesTr" / f"s{i}.png", image),
                      "label": save_png(root / "labelsTr" / f"s{i}.png", label)})
    dataset = write_dataset_json(root / "dataset.json", "spots", cases, {0: "background", 1: "spot"},
                                 {0: "red", 1: "green", 2: "blue"})
    run = root / "run"
    preprocess = {"intensity": "rgb", "spatial_dims": 2, "orientation": "RA", "target_spacing": None,
                  "patch_size": [16, 16], "slice_size": [16, 16], "samples_per_volume": 2, "augment": False}
    fit_scratch_unet(run, dataset, "spots", {"in_channels": 3, "out_channels": 1, "channels": [8, 16], "strides": [2],
                                             "spatial_dims": 2}, preprocess, [16, 16], max_steps=40, batch_size=2, lr=0.02)
    return run


def test_2d_images_predict_into_masks_of_their_own_format(run_2d, tmp_path, capsys):
    scans = tmp_path / "scans"
    image, label = spot_image(5)
    save_png(scans / "a.png", image)
    Image.fromarray(image).save(scans / "b.tif")
    Image.fromarray(image).save(scans / "c.jpg", quality=100)
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in scans.iterdir()}
    rows = main(["--run", str(run_2d), "--input", str(scans), "--output", str(tmp_path / "out"), "--no-progress"])
    assert [Path(r["mask"]).name for r in rows] == ["a_mask.png", "b_mask.tif", "c_mask.png"]  # JPEG: lossless PNG
    written = list(csv.DictReader(open(tmp_path / "out" / "volumes.csv", newline="", encoding="utf-8")))
    assert [r["mask"] for r in written] == [r["mask"] for r in rows]
    predictor = Predictor.from_runs([run_2d], device="cpu")
    for row, scan in zip(written, sorted(scans.iterdir())):
        mask = Image.open(row["mask"])
        assert mask.size == (W, H) and mask.mode == "L"  # the input's size
        pixels = np.asarray(mask)
        np.testing.assert_array_equal(pixels, predictor.predict(scan).mask.T)  # rows are image rows
        assert row["lesion_area_px"] == str(int(np.count_nonzero(pixels))) and row["lesion_area_mm2"] == ""
        assert row["lesion_volume_ml"] == "" and row["voxel_ml"] == ""
        # the network found the spot, where it is: Dice against the label
        dice = 2 * np.sum((pixels > 0) & (label > 0)) / (np.sum(pixels > 0) + np.sum(label > 0))
        assert dice > 0.8, (scan, dice)
    assert set(np.unique(np.asarray(Image.open(written[0]["mask"])))) == {0, 1}  # label values, as training's PNGs
    printed = capsys.readouterr().out
    total = sum(int(r["lesion_area_px"]) for r in written)
    assert f"a: lesion area {written[0]['lesion_area_px']} px" in printed
    assert f"3 scan(s), total lesion area {total:.2f} px" in printed
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in scans.iterdir()} == before
