"""nnU-Net's inference: test-time mirroring along the axes training flips, and the largest-connected-component
postprocessing chosen on the fold's validation cases, recorded in metrics.json and applied by predict and the bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from omegaconf import OmegaConf
from scipy import ndimage

from segadapt.export.bundle import inference_config
from segadapt.inference import Predictor
from segadapt.training.postprocessing import recorded_postprocessing
from segadapt.runs import read_metrics, read_run_config
from segadapt.training import SegAdaptModule
from segadapt.training.postprocessing import choose_postprocessing, component_counts, keep_largest_component, pooled_choice
from segadapt.training.config import module_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
UNET = {"in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2], "num_res_units": 0}
MULTIVIEW = {"in_channels": 1, "out_channels": 1, "channels": [4, 8], "strides": [2], "num_res_units": 0}


def _unet_module(**kw) -> SegAdaptModule:
    torch.manual_seed(0)
    return SegAdaptModule(model="unet3d", model_kwargs=UNET, adapter="scratch", roi_size=[8, 8, 8], sw_batch_size=1,
                          overlap=0.25, **kw).eval()


def _window_probabilities(module: SegAdaptModule, x: torch.Tensor) -> torch.Tensor:
    """The plain prediction, written out: MONAI's Gaussian sliding window, softmax over the two classes."""
    with torch.no_grad():
        logits = sliding_window_inference(x, [8, 8, 8], 1, module.net, overlap=0.25, mode="gaussian")
    return torch.softmax(logits, dim=1)


def test_tta_is_the_mean_of_the_flipped_sliding_window_predictions():
    x = torch.randn(1, 1, 12, 10, 9, generator=torch.Generator().manual_seed(0))
    module = _unet_module(tta=True, mirror_axes=[0, 1])
    plain = _window_probabilities(module, x)
    flipped = {dims: _window_probabilities(module, x.flip(dims)).flip(dims) for dims in [(2,), (3,), (2, 3)]}
    assert all((plain - f).abs().max() > 1e-3 for f in flipped.values())  # the network is not flip-equivariant
    expected = (plain + sum(flipped.values())) / 4
    torch.testing.assert_close(module.predict_probabilities(x), expected, atol=1e-6, rtol=1e-5)

    off = _unet_module(tta=False, mirror_axes=[0, 1])
    torch.testing.assert_close(off.predict_probabilities(x), plain, atol=1e-6, rtol=1e-5)
    assert (off.predict_probabilities(x) - expected).abs().max() > 1e-4


def test_tta_of_the_multiview_unet_mirrors_the_volume_before_slicing():
    torch.manual_seed(0)
    module = SegAdaptModule(model="multiview_unet", model_kwargs=MULTIVIEW, adapter="scratch", tta=True,
                            mirror_axes=[0], slice_batch_size=8).eval()
    x = torch.randn(1, 1, 12, 10, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = module.net.predict_volume(x)
        flipped = module.net.predict_volume(x.flip(2)).flip(2)
    assert (plain - flipped).abs().max() > 1e-3
    torch.testing.assert_close(module.predict_probabilities(x), (plain + flipped) / 2, atol=1e-6, rtol=1e-5)


def test_old_runs_without_tta_predict_plainly():
    """A run config from before test-time mirroring has no `tta`: the module predicts as it did."""
    x = torch.randn(1, 1, 12, 10, 9, generator=torch.Generator().manual_seed(0))
    module = _unet_module()
    assert module.hparams.tta is False
    torch.testing.assert_close(module.predict_probabilities(x), _window_probabilities(module, x))


@pytest.mark.parametrize("augment, axes", [(True, [0]), (False, [])])
def test_the_model_configs_mirror_along_the_axes_training_flips(augment, axes):
    for path in sorted((CONFIGS / "model").glob("*.yaml")):
        group = OmegaConf.load(path)
        if "inference" not in group:  # model=auto: its defaults list takes dynunet's
            assert "dynunet" in group["defaults"], path.name
            continue
        # on for the planned 3D network (hippocampus: never below off), opt-in for the others (the demo's
        # multi-view UNet lost Dice with it)
        assert group["inference"]["tta"] is (path.stem == "dynunet"), path.name
    model = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / "unet3d.yaml"))
    model["inference"]["tta"] = True
    cfg = {"model": model, "optim": {}, "loss": {}, "threshold": 0.5}
    data = {"preprocess": {"augment": augment}, "batch_size": 1, "volume_bins_ml": [0, 5, "inf"]}
    args = module_args(cfg, data, 3, None, {"spec": "scratch", "lr": 1e-3})
    assert args["tta"] is True and args["mirror_axes"] == axes
    model["inference"]["tta"] = False
    assert "mirror_axes" not in module_args(cfg, data, 3, None, {"spec": "scratch", "lr": 1e-3})


def _blob(shape, *boxes, value: int = 1) -> np.ndarray:
    out = np.zeros(shape, dtype=np.int64)
    for box in boxes:
        out[tuple(slice(a, b) for a, b in box)] = value
    return out


SHAPE = (20, 20, 20)
TRUE_BLOB = [(2, 8)] * 3                     # 216 voxels
SPURIOUS = [(14, 16)] * 3                    # 8 voxels
SECOND = [(12, 15), (2, 5), (12, 15)]        # 27 voxels, a true second component


def _counts(pred: np.ndarray, truth: np.ndarray, classes: int = 1) -> dict:
    return component_counts(torch.as_tensor(pred), torch.as_tensor(truth), classes)


def test_a_spurious_blob_is_removed_and_a_true_second_component_is_kept():
    truth = _blob(SHAPE, TRUE_BLOB)
    spurious = _counts(_blob(SHAPE, TRUE_BLOB, SPURIOUS), truth)
    chosen = choose_postprocessing({"a": spurious})
    assert chosen["largest_component"] == [True]
    assert chosen["dice_without"] == pytest.approx([2 * 216 / (224 + 216)]) and chosen["dice_with"] == pytest.approx([1.0])
    assert chosen["dice"] == pytest.approx(1.0) and chosen["n_cases"] == 1

    truth2 = _blob(SHAPE, TRUE_BLOB, SECOND)
    two = _counts(truth2.copy(), truth2)
    kept = choose_postprocessing({"b": two})
    assert kept["largest_component"] == [False]
    assert kept["dice_with"] == pytest.approx([2 * 216 / (216 + 243)]) and kept["dice_without"] == pytest.approx([1.0])
    assert kept["dice"] == pytest.approx(1.0)

    # both cases: mean Dice without (432/440 + 1) / 2 vs with (1 + 432/459) / 2 -> with is lower: not chosen
    both = choose_postprocessing({"a": spurious, "b": two})
    assert both["largest_component"] == [False]
    assert both["dice"] == pytest.approx((432 / 440 + 1.0) / 2)


def test_classes_are_decided_apart_and_the_foreground_dice_uses_the_choice():
    truth = _blob(SHAPE, TRUE_BLOB) + _blob(SHAPE, [(12, 15), (12, 15), (2, 5)], [(12, 15), (2, 5), (12, 15)], value=2)
    pred = truth.copy()
    pred[tuple(slice(a, b) for a, b in SPURIOUS)] = 1  # class 1: a spurious blob; class 2: two true components
    record = choose_postprocessing({"c": _counts(pred, truth, classes=2)})
    assert record["classes"] == [1, 2] and record["largest_component"] == [True, False]
    assert record["dice_without"] == pytest.approx([432 / 440, 1.0])
    assert record["dice_with"] == pytest.approx([1.0, 2 * 27 / 81])
    assert record["dice"] == pytest.approx(1.0)  # class 1 cleaned, class 2 kept: the truth exactly


def test_a_fold_ensemble_decides_on_the_pooled_validation_cases():
    a = {"n_cases": 3, "dice_with": [0.80, 0.5], "dice_without": [0.70, 0.6], "largest_component": [True, False]}
    b = {"n_cases": 1, "dice_with": [0.40, 0.9], "dice_without": [0.60, 0.6], "largest_component": [False, True]}
    # class 1: (3 * 0.8 + 0.4) / 4 = 0.70 >= (3 * 0.7 + 0.6) / 4 = 0.675; class 2: 0.6 < 0.6 is false: 0.6 >= 0.6
    assert pooled_choice([a, b]) == [True, True]
    assert pooled_choice([a, {**b, "n_cases": 5}]) == [False, True]  # (2.4 + 2) / 8 = 0.55 < (2.1 + 3) / 8
    assert pooled_choice([a, None]) == []  # a run without a record (trained before): no postprocessing


def test_a_run_records_its_choice_on_its_validation_cases(demo_runs):
    for run in demo_runs:
        metrics = read_metrics(run)
        record = metrics["postprocessing"]
        assert record["n_cases"] == len(metrics["cases"]) and record["classes"] == [1]
        # one class: its Dice without postprocessing is the raw foreground Dice of metrics.json's val
        assert record["dice_without"][0] == pytest.approx(metrics["val"]["dice"], abs=1e-6)
        assert record["largest_component"] == [record["dice_with"][0] >= record["dice_without"][0]]
        assert "components" not in metrics["cases"][0]


def _largest(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component, by scipy."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return (labels == 1 + int(np.argmax(sizes))).astype(mask.dtype)


def _with_record(run: Path, folder: Path, largest_component) -> Path:
    copy = shutil.copytree(run, folder)
    metrics = read_metrics(copy)
    metrics["postprocessing"] = None if largest_component is None else {
        **metrics["postprocessing"], "largest_component": largest_component,
        "dice_with": [1.0 if largest_component[0] else 0.0], "dice_without": [0.5]}
    (copy / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return copy


def test_predict_applies_the_recorded_choice(demo_runs, tmp_path, capsys):
    from segadapt.inference.cli import main

    scan = read_run_config(demo_runs[0])["datamodule"]["dataset_json"]
    scan = str(Path(scan).parent / "imagesTr" / sorted(p.name for p in (Path(scan).parent / "imagesTr").iterdir())[0])
    on = _with_record(demo_runs[0], tmp_path / "on", [True])
    off = _with_record(demo_runs[0], tmp_path / "off", [False])
    old = _with_record(demo_runs[0], tmp_path / "old", None)
    assert recorded_postprocessing([on]) == [True] and recorded_postprocessing([off]) == [False]
    assert recorded_postprocessing([old]) == []
    probabilities = Predictor.from_runs([off], device="cpu").predict(scan).probabilities[0]
    # a threshold whose raw mask has several components (a two-step network)
    threshold = next(t for t in np.quantile(probabilities, [0.9, 0.8, 0.7, 0.95, 0.6, 0.5])
                     if ndimage.label(probabilities > t, structure=np.ones((3, 3, 3)))[1] > 1)
    masks = {}
    for name, run in [("on", on), ("off", off), ("old", old)]:
        capsys.readouterr()
        main(["--run", str(run), "--input", scan, "--output", str(tmp_path / f"out_{name}"), "--device", "cpu",
              "--threshold", str(threshold)])
        assert ("largest component kept of class(es) 1" in capsys.readouterr().out) == (name == "on")
        masks[name] = np.asarray(nib.load(next((tmp_path / f"out_{name}").glob("*_mask.nii.gz"))).dataobj)
    raw = (probabilities > threshold).astype(np.uint8)
    np.testing.assert_array_equal(masks["off"], raw)
    np.testing.assert_array_equal(masks["old"], raw)
    np.testing.assert_array_equal(masks["on"], _largest(raw))
    assert masks["on"].sum() < raw.sum()


@pytest.mark.parametrize("largest_component, classes", [([True], [1]), ([False], None), ([], None),
                                                         ([False, True], [2])])
def test_the_bundle_postprocessing_has_the_transform_iff_chosen(demo_runs, largest_component, classes):
    config = read_run_config(demo_runs[0])
    config["module"] = {**config["module"], "model": "unet3d", "model_kwargs": {**UNET, "in_channels": 3},
                        "roi_size": [16, 16, 16]}
    steps = inference_config(config, largest_component=largest_component)["postprocessing"]["transforms"]
    kept = [s for s in steps if s["_target_"] == "KeepLargestConnectedComponentd"]
    if classes is None:
        assert not kept
    else:
        assert kept == [{"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": classes,
                         "is_onehot": False, "independent": True}]
        names = [s["_target_"] for s in steps]
        assert names.index("AsDiscreted") < names.index("KeepLargestConnectedComponentd") < names.index("SaveImaged")


def test_the_bundle_run_in_monai_keeps_the_largest_component_as_predict_does(tmp_path):
    """A tiny DynUNet run whose record chooses the postprocessing: the bundle (run by ``monai.bundle.run``) and
    ``segadapt predict`` write the same masks, the largest component of the raw mask."""
    from monai.bundle import run as monai_run

    from segadapt.export.bundle import export_bundle
    from segadapt.data import PreprocessConfig, make_phantom_dataset
    from segadapt.io import save_safetensors
    from segadapt.models import build_model
    from segadapt.training import RunConfig, fit_run

    dataset = make_phantom_dataset(tmp_path / "data", "sah", 4, 0, (24, 24, 16), [220 / 24, 220 / 24, 10.0])
    kwargs = {"in_channels": 3, "out_channels": 1, "kernel_size": [3, 3, 3], "strides": [1, 2, 2], "filters": [4, 8, 16]}
    torch.manual_seed(0)
    base = save_safetensors(tmp_path / "base.safetensors", {k: v.clone() for k, v in build_model("dynunet", **kwargs).state_dict().items()})
    module = {"model": "dynunet", "model_kwargs": kwargs, "adapter": {"method": "conv_lora", "rank": 2},
              "preset": "all_conv", "lr": 3e-2, "base_checkpoint": str(base), "roi_size": [16, 16, 16]}
    data = {"dataset_json": str(dataset), "fold": 0, "n_folds": 2, "batch_size": 1, "sampling": "patch",
            "preprocess": PreprocessConfig(patch_size=[16, 16, 16], samples_per_volume=1, augment=False).to_dict()}
    trainer = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
               "num_sanity_val_steps": 0, "check_val_every_n_epoch": 10_000, "max_steps": 2}
    trained = tmp_path / "trained"
    fit_run(RunConfig(trained, {"experiment": "t", "method": "conv_lora", "fold": 0}, module, data, trainer, eval_base=False))
    run = _with_record(trained, tmp_path / "run", [True])
    scan = str(sorted((tmp_path / "data" / "imagesTr").glob("*.nii.gz"))[0])
    probabilities = Predictor.from_runs([trained], device="cpu").predict(scan).probabilities[0]
    values = np.unique(probabilities)
    threshold = next(t for t in ((values[k] + values[k + 1]) / 2 for k in (int(q * len(values)) for q in (0.8, 0.9, 0.7, 0.95)))
                     if ndimage.label(probabilities > t, structure=np.ones((3, 3, 3)))[1] > 1)
    ours = Predictor.from_runs([run], device="cpu", threshold=float(threshold)).predict(scan).mask
    bundle = export_bundle(run, tmp_path / "bundle")
    monai_run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), datalist=[scan],
              output_dir=str(tmp_path / "out"), threshold=float(threshold))
    theirs = np.asarray(nib.load(next((tmp_path / "out").glob("*_seg.nii.gz"))).dataobj)
    raw = (probabilities > threshold).astype(np.uint8)
    np.testing.assert_array_equal(ours, _largest(raw))
    np.testing.assert_array_equal(theirs, ours)
    assert ours.sum() < raw.sum()


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_keep_largest_component_keeps_the_input_type(kind):
    """predict writes numpy masks: the postprocessed mask is an array of the input's type (MONAI returns tensors)."""
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[0, 0, 0] = 1  # a one-voxel blob
    labels[2:4, 2:4, 2:4] = 1  # the largest component, 8 voxels
    given = labels if kind == "numpy" else torch.from_numpy(labels)
    kept = keep_largest_component(given, [1])
    assert type(kept) is type(given)
    expected = labels.copy()
    expected[0, 0, 0] = 0
    np.testing.assert_array_equal(np.asarray(kept), expected)
