"""nnU-Net v2 interop: trained-model folders (network, checkpoint, plans -> preprocessing, export back), the
deep-supervision loss, raw datasets (two channels, name -> int labels)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from monai.losses import DiceCELoss
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from nnunet_fixtures import PATCH, SHAPE, plans, reference_network, write_raw_dataset, write_results  # noqa: E402

from segadapt.adapters import AdapterConfig, inject  # noqa: E402
from segadapt.data import LoadCased, load_dataset_json  # noqa: E402
from segadapt.models import build_model, load_pretrained, preset_targets  # noqa: E402
from segadapt.export.nnunet import export_nnunet  # noqa: E402
from segadapt.models.nnunet import read_checkpoint, read_results  # noqa: E402
from segadapt.plan.nnunet import network_orientation, plan_from_nnunet, transpose_for  # noqa: E402
from segadapt.training import SegAdaptModule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    results, network = write_results(root / "results")
    return {"root": root, "results": results, "network": network, "dataset": write_raw_dataset(root / "raw")}


# ---- raw datasets ------------------------------------------------------------------------------------------
def test_v2_raw_dataset_with_two_channels_is_read_as_it_is(world):
    description = load_dataset_json(world["dataset"])
    assert description.channels == 2 and description.labels == {0: "background", 1: "lesion"}
    assert [c.case_id for c in description.cases] == [f"toy_{i:03d}" for i in range(6)]
    case = description.cases[2]
    assert [p.name for p in case.images] == ["toy_002_0000.nii.gz", "toy_002_0001.nii.gz"]
    loaded = LoadCased(("image", "label"), description.label_values, channels=2)(case.as_dict())
    for c in range(2):  # channel c is file _000c
        expected = np.asarray(nib.load(case.images[c]).dataobj)
        np.testing.assert_allclose(loaded["image"][c].numpy(), expected)
    assert tuple(loaded["label"].shape) == (1, *SHAPE)


def _v2(tmp_path, **changes):
    path = write_raw_dataset(tmp_path, n=2)
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))
    return path


def test_v2_one_value_region_is_that_value_and_a_multi_value_region_is_refused(tmp_path):
    path = _v2(tmp_path, labels={"background": 0, "lesion": [1]})
    assert load_dataset_json(path).labels == {0: "background", 1: "lesion"}
    path = _v2(tmp_path, labels={"background": 0, "whole": [1, 2], "core": 2}, regions_class_order=[1, 2])
    with pytest.raises(ValueError, match=r"label 'whole' is the region \[1, 2\].*remap"):
        load_dataset_json(path)


def test_v2_num_training_and_missing_channel_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="numTraining is 5 but 2 labelled cases"):
        load_dataset_json(_v2(tmp_path, numTraining=5))
    path = _v2(tmp_path / "b")
    (tmp_path / "b" / "imagesTr" / "toy_001_0001.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"case 'toy_001'.*channel files \[0\]"):
        load_dataset_json(path)


# ---- network and checkpoint ------------------------------------------------------------------------------
def test_network_computes_what_the_checkpoint_s_network_computes(world):
    checkpoint = read_checkpoint(world["results"] / "fold_0" / "checkpoint_final.pth")  # weights_only=True
    assert checkpoint["trainer_name"] == "nnUNetTrainer" and checkpoint["init_args"]["configuration"] == "3d_fullres"
    net = build_model("nnunet", results=str(world["results"]), in_channels=2, out_channels=2)
    report = load_pretrained(net, world["results"] / "fold_0" / "checkpoint_final.pth")
    assert report.ok
    x = torch.randn(1, 2, *PATCH, generator=torch.Generator().manual_seed(0))
    reference = world["network"].eval()
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), reference(x), rtol=0, atol=0)
        outputs = net.train()(x)  # deep supervision in training: full resolution first
    assert [tuple(o.shape) for o in outputs] == [(1, 2, 16, 16, 16), (1, 2, 8, 8, 8)]


def test_channel_count_disagreeing_with_the_folder_is_refused(world):
    with pytest.raises(ValueError, match="in_channels=2 .* the run gives 1"):
        build_model("nnunet", results=str(world["results"]), in_channels=1)


def test_presets_cover_every_conv_and_adapters_reach_the_forward(world):
    net = build_model("nnunet", results=str(world["results"]))
    load_pretrained(net, world["results"] / "fold_0" / "checkpoint_final.pth")
    convs = [m for m in set(net.modules()) if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    names = preset_targets(net, "all_conv")
    assert len(names) == len(convs) == 14
    decoder = preset_targets(net, "decoder")
    assert sum(isinstance(net.get_submodule(n), torch.nn.ConvTranspose3d) for n in decoder) == 2
    assert set(preset_targets(net, "encoder")) | set(preset_targets(net, "bottleneck")) | set(decoder) == set(names)
    x = torch.randn(1, 2, *PATCH, generator=torch.Generator().manual_seed(1))
    net.eval()
    with torch.no_grad():
        before = net(x)
        inject(net, AdapterConfig(method="lora_c", rank=2, targets=names))
        torch.testing.assert_close(net(x), before)  # zero update at initialisation
        for name, p in net.named_parameters():
            if p.requires_grad:
                p.add_(0.05)
        called = []
        for name in names:  # every adapted layer is on the path the forward runs (not a registered alias)
            net.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: called.append(name))
        assert (net(x) - before).abs().max() > 1e-3
    assert sorted(called) == sorted(names)


def test_unsafe_checkpoint_is_refused(tmp_path, world):
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": world["network"].state_dict(), "trainer": Path("x")}, path)
    with pytest.raises(ValueError, match="weights_only"):
        read_checkpoint(path)


# ---- plans -> preprocessing ------------------------------------------------------------------------------
def test_plans_decide_spacing_patch_normalisation_and_orientation(tmp_path, world):
    plan = plan_from_nnunet(read_results(world["results"]), world["dataset"])
    fields = plan.preprocess_fields()
    assert fields["target_spacing"] == [1.0, 1.0, 1.0] and fields["patch_size"] == PATCH
    assert fields["intensity"] == "zscore" and fields["background_value"] == [None, None]
    assert fields["orientation"] == "SAR"  # RAS files read as SimpleITK arrays: axes reversed, no transpose
    assert plan.network_fields()["nnunet"] == {"out_channels": 2}
    ct, _ = write_results(tmp_path / "ct", normalization="CTNormalization", transpose=(2, 1, 0))
    fields = plan_from_nnunet(read_results(ct), world["dataset"]).preprocess_fields()
    props = plans()["foreground_intensity_properties_per_channel"]
    assert fields["intensity"] == "ct_zscore" and fields["orientation"] == "RAS"
    assert fields["clip_range"] == [[props[c]["percentile_00_5"], props[c]["percentile_99_5"]] for c in "01"]
    assert fields["norm_mean"] == [100.0, 101.0] and fields["norm_std"] == [50.0, 51.0]


def test_orientation_and_transpose_are_inverse():
    for codes in (("R", "A", "S"), ("L", "P", "S"), ("P", "S", "R")):
        for orientation in ("RAS", "SAR", "ASR"):
            transpose = transpose_for(codes, orientation)
            seen = network_orientation(codes, transpose)
            assert [c in (o, {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}[o])
                    for c, o in zip(seen, orientation)] == [True] * 3


def test_unsupported_configurations_are_refused(world):
    with pytest.raises(ValueError, match="only 3D configurations"):
        read_results(world["results"], "2d")
    with pytest.raises(ValueError, match="configuration '3d_lowres' not found"):
        read_results(world["results"], "3d_lowres")


# ---- deep supervision loss -------------------------------------------------------------------------------
def test_deep_supervision_loss_is_nnunet_s_weighted_sum(world):
    module = SegAdaptModule(model="nnunet", model_kwargs={"results": str(world["results"]), "in_channels": 2,
                                                          "out_channels": 2}, adapter="scratch")
    g = torch.Generator().manual_seed(0)
    label = (torch.rand(2, 1, 8, 8, 8, generator=g) > 0.5).float()
    outputs = [torch.randn(2, 2, 8, 8, 8, generator=g), torch.randn(2, 2, 4, 4, 4, generator=g),
               torch.randn(2, 2, 2, 2, 2, generator=g)]
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    # weights 1, 1/2, 0 (the lowest resolution's), normalised; the label downsampled as batchgeneratorsv2's
    # DownsampleSegForDSTransform (nearest-exact): output voxel i takes input voxel floor((i + 0.5) * 2) = 2i + 1
    expected = (1 * loss_fn(outputs[0], label) + 0.5 * loss_fn(outputs[1], label[:, :, 1::2, 1::2, 1::2])) / 1.5
    torch.testing.assert_close(module._loss(outputs, label), expected)


# ---- a run: load -> inject -> train -> save -> load_run -> predict -> export --------------------------------
def _cfg(tmp_path, world, **changes):
    overrides = {"model": "nnunet", "model.kwargs.results": str(world["results"]), "data": "dataset_json",
                 "data.dataset_json": str(world["dataset"]), "data.name": "toy", "data.n_folds": 2,
                 "data.batch_size": 1, "data.preprocess.samples_per_volume": 1, "data.preprocess.cache": "none",
                 "data.preprocess.augment": "false", "selection.inner_fraction": 0, "paths.runs": str(tmp_path),
                 "trainer.max_steps": 2, "trainer.enable_progress_bar": "false", "eval_base": "false",
                 "checkpoint_every": 100, "adapter": "lora_c", **changes}
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"{k}={v}" for k, v in overrides.items()])
    return OmegaConf.to_container(cfg, resolve=True)


def test_adapt_save_reload_predict_and_export_back(tmp_path, world):
    from segadapt.training import load_run, train

    cfg = _cfg(tmp_path, world)
    assert cfg["base_checkpoint"] == str(world["results"] / "fold_0" / "checkpoint_final.pth")
    result = train(cfg)
    run_dir = Path(cfg["run_dir"])
    assert (run_dir / "adapter.safetensors").is_file() and math.isfinite(result["val"]["dice"])
    module, config = load_run(run_dir)
    assert config["datamodule"]["preprocess"]["orientation"] == "SAR"
    assert config["datamodule"]["preprocess"]["patch_size"] == PATCH
    x = torch.randn(1, 2, 20, 18, 16, generator=torch.Generator().manual_seed(2))
    probabilities = module.predict_probabilities(x)
    assert tuple(probabilities.shape) == (1, 2, 20, 18, 16)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(1, 20, 18, 16))

    out = export_nnunet(run_dir, tmp_path / "exported")
    assert json.loads((out / "plans.json").read_text()) == plans()
    checkpoint = torch.load(out / "fold_0" / "checkpoint_final.pth", weights_only=True)
    assert {"network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes"} <= set(checkpoint)
    fresh = reference_network()
    fresh.load_state_dict(checkpoint["network_weights"])  # plain, strict
    x = torch.randn(1, 2, *PATCH, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), module.net(x), atol=1e-5, rtol=1e-4)
        assert (fresh(x) - world["network"].eval()(x)).abs().max() > 0  # the adapted network, not the base
    with pytest.raises(ValueError, match="exists"):
        export_nnunet(run_dir, tmp_path / "exported")


def test_export_never_writes_over_the_base_folder_and_overwrites_only_with_force(tmp_path, world, capsys):
    """--nnunet into the base's own trained-model folder would replace the checkpoint the run adapts: refused,
    --force or not, nothing changed; an earlier export is replaced only with --force (19.4)."""
    from segadapt.export.cli import main as export_main
    from segadapt.training import train

    cfg = _cfg(tmp_path, world)
    train(cfg)

    def files(folder: Path) -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def refused(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as info:
            export_main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1
        return err

    before = files(world["results"])
    err = refused([cfg["run_dir"], "--nnunet", str(world["results"]), "--force"])
    assert "checkpoint_final.pth is the run's nnU-Net base checkpoint" in err and "--force or not" in err
    assert files(world["results"]) == before
    export_main([cfg["run_dir"], "--nnunet", str(tmp_path / "out")])
    exported = files(tmp_path / "out")
    assert "checkpoint_final.pth exists; give --force" in refused([cfg["run_dir"], "--nnunet", str(tmp_path / "out")])
    assert files(tmp_path / "out") == exported
    checkpoint = tmp_path / "out" / "fold_0" / "checkpoint_final.pth"
    first = read_checkpoint(checkpoint)["network_weights"]
    export_main([cfg["run_dir"], "--nnunet", str(tmp_path / "out"), "--force"])
    again = files(tmp_path / "out")
    assert again.keys() == exported.keys() and again[checkpoint] != exported[checkpoint]  # written again
    for key, value in read_checkpoint(checkpoint)["network_weights"].items():  # the same network
        torch.testing.assert_close(value, first[key], atol=0, rtol=0)


# ---- splits_final.json --------------------------------------------------------------------------------------
def _nnunet_splits(ids, vals):
    """nnU-Net's format (nnunetv2 nnUNetTrainer.do_split: a list of {'train': [...], 'val': [...]})."""
    return [{"train": [c for c in ids if c not in v], "val": list(v)} for v in vals]


def test_nnunet_splits_final_is_used_as_it_is_and_segadapt_writes_the_same_format(tmp_path, monkeypatch):
    from segadapt.data import load_or_create_splits

    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    path = write_raw_dataset(tmp_path / "Dataset901_Toy", n=6)
    ids = [f"toy_{i:03d}" for i in range(6)]
    made = load_or_create_splits(path, n_folds=3, seed=0)  # segadapt's own split, written as nnU-Net writes
    written = json.loads(made.path.read_text())
    assert written == _nnunet_splits(ids, [sorted(f) for f in made.folds])
    # an nnU-Net study's splits_final.json in $nnUNet_preprocessed/<Dataset> decides the folds
    vals = [["toy_000", "toy_005"], ["toy_001", "toy_004"], ["toy_002", "toy_003"]]
    preprocessed = tmp_path / "preprocessed"
    (preprocessed / "Dataset901_Toy").mkdir(parents=True)
    (preprocessed / "Dataset901_Toy" / "splits_final.json").write_text(json.dumps(_nnunet_splits(ids, vals)))
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    splits = load_or_create_splits(path, n_folds=3, seed=0)
    assert splits.path == preprocessed / "Dataset901_Toy" / "splits_final.json"
    assert [list(splits.val_ids(k)) for k in range(3)] == vals
    assert list(splits.train_ids(1)) == ["toy_000", "toy_005", "toy_002", "toy_003"]
    with pytest.raises(ValueError, match="holds 3 folds, asked for 5: set data.n_folds=3"):
        load_or_create_splits(path, n_folds=5, seed=0)
    # beside dataset.json wins over $nnUNet_preprocessed; a train list that is not the complement is refused
    bad = _nnunet_splits(ids, vals)
    bad[0]["train"] = bad[0]["train"][:-1]
    (path.parent / "splits_final.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"splits_final.json: fold 0's 'train' is not every case outside its 'val'"):
        load_or_create_splits(path, n_folds=3, seed=0)


def test_segadapt_s_earlier_splits_files_still_read(tmp_path):
    from segadapt.data import load_or_create_splits

    path = write_raw_dataset(tmp_path / "d", n=4)
    old = {"dataset": "toy", "n_folds": 2, "seed": 0, "folds": [{"val": ["toy_000", "toy_001"]},
                                                                {"val": ["toy_002", "toy_003"]}]}
    (path.parent / "splits_2fold_seed0.json").write_text(json.dumps(old))
    splits = load_or_create_splits(path, n_folds=2, seed=0)
    assert splits.val_ids(1) == ("toy_002", "toy_003") and splits.train_ids(1) == ("toy_000", "toy_001")


def test_model_nnunet_without_a_results_folder_is_one_clear_error(tmp_path, world):
    from segadapt.plan.apply import run_plan

    cfg = _cfg(tmp_path, world, **{"model.kwargs.results": "null"})
    with pytest.raises(ValueError, match=r"model=nnunet needs model.kwargs.results=DIR"):
        run_plan(cfg, pretraining=False, prepare=lambda data: Path(data["dataset_json"]))


@pytest.mark.parametrize("extra, message", [
    ([], "error: dataset description not found: "),
    (["--intensity", "ct"], "error: python -m segadapt.plan.nnunet: argument --intensity: invalid choice: 'ct'"),
])
def test_plans_command_refuses_bad_input_in_one_line(tmp_path, capsys, extra, message):
    """`python -m segadapt.plan.nnunet` (the one-line parser and handler): one error line, exit 2, nothing written."""
    from segadapt.plan.nnunet import main

    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "missing.json"), str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
