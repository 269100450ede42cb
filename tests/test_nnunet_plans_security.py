"""A plans.json names classes; nothing else in it may run. Planted trained-model folders whose plans name a
code-running callable (``torch.hub.load`` of a folder holding a ``hubconf.py`` that writes a marker file)
through each key a plans file can carry, or describe an absurdly large network: refused in one line naming
the file and key, through :func:`build_nnunet` and through ``scripts/train.py model=nnunet``; the marker
file is never written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from nnunet_fixtures import ARCH_KWARGS, write_raw_dataset, write_results  # noqa: E402

from segadapt.cli import check_hydra_request  # noqa: E402
from segadapt.errors import user_errors  # noqa: E402
from segadapt.models.nnunet import MAX_PARAMETERS, NETWORK_CLASSES, OP_CLASSES, build_nnunet, read_results  # noqa: E402
from segadapt.training import train  # noqa: E402
from segadapt.training.jobs import check_request  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
HUB_LOAD = "torch.nn.modules.module.torch.hub.load"  # passes a "torch.nn." prefix check; pydoc.locate finds it


def _hub(tmp: Path) -> tuple[dict, Path]:
    """A torch.hub folder whose hubconf.py writes a marker when imported; (hub.load kwargs, marker)."""
    hub, marker = tmp / "hub", tmp / "PAYLOAD_RAN"
    hub.mkdir(exist_ok=True)
    (hub / "hubconf.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                    "def net(*args, **kwargs):\n    return None\n", encoding="utf-8")
    return {"repo_or_dir": str(hub), "model": "net", "source": "local"}, marker


def _class_payload(arch: dict, hub: dict) -> None:
    arch["network_class_name"] = HUB_LOAD
    arch["arch_kwargs"] = hub


def _op_payload(key: str, kwargs_key: str | None):
    def plant(arch: dict, hub: dict) -> None:
        arch["arch_kwargs"][key] = HUB_LOAD
        if kwargs_key:
            arch["arch_kwargs"][kwargs_key] = hub
        if key not in arch["_kw_requires_import"]:
            arch["_kw_requires_import"].append(key)
    return plant


PAYLOADS = {
    # name: (plant(architecture, hub kwargs), the key the message names)
    "network_class_name": (_class_payload, "architecture.network_class_name"),
    "nonlin": (_op_payload("nonlin", "nonlin_kwargs"), "architecture.arch_kwargs.nonlin"),
    "dropout_op": (_op_payload("dropout_op", "dropout_op_kwargs"), "architecture.arch_kwargs.dropout_op"),
    "norm_op": (_op_payload("norm_op", "norm_op_kwargs"), "architecture.arch_kwargs.norm_op"),
    "conv_op": (_op_payload("conv_op", None), "architecture.arch_kwargs.conv_op"),
    "kw_requires_import_extra_key": (_op_payload("block", None), "architecture.arch_kwargs.block"),
}


def _planted(tmp: Path, name: str) -> tuple[Path, Path, str]:
    """(trained-model folder with payload `name` in its plans, marker file, key)."""
    folder, _ = write_results(tmp / "results")
    hub, marker = _hub(tmp)
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    plant, key = PAYLOADS[name]
    plant(plans["configurations"]["3d_fullres"]["architecture"], hub)
    (folder / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    return folder, marker, key


def _one_line_naming(message: str, folder: Path, key: str) -> None:
    assert "\n" not in message.strip(), message
    assert f"{folder / 'plans.json'}: configurations.3d_fullres.{key}" in message, message


@pytest.mark.parametrize("name", PAYLOADS)
def test_payload_never_runs_through_build_nnunet(name, tmp_path):
    folder, marker, key = _planted(tmp_path, name)
    with pytest.raises(ValueError) as info:
        build_nnunet(str(folder))
    assert not marker.exists(), "the plans file ran code"
    _one_line_naming(str(info.value), folder, key)
    assert HUB_LOAD in str(info.value) and "not one of the classes a plans file may name" in str(info.value)


def _train_argv(tmp: Path, folder: Path) -> list[str]:
    dataset = write_raw_dataset(tmp / "raw", n=4)
    return ["model=nnunet", f"model.kwargs.results={folder}", "data=dataset_json", f"data.dataset_json={dataset}",
            "data.name=toy", "data.n_folds=2", f"paths.runs={tmp / 'runs'}", f"run_dir={tmp / 'run'}",
            "trainer.max_steps=1", "eval_base=false", "adapter=lora_c", "trainer.threads=1"]


@pytest.mark.parametrize("name", PAYLOADS)
def test_payload_never_runs_through_the_train_job(name, tmp_path, capsys):
    """What scripts/train.py does in process: the checks before Hydra writes, then the job."""
    folder, marker, key = _planted(tmp_path, name)
    argv = _train_argv(tmp_path, folder)
    with pytest.raises(SystemExit) as exit_:
        check_hydra_request(CONFIGS, "train", check_request, argv)
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = OmegaConf.to_container(compose("train", overrides=argv), resolve=True)
        with user_errors():
            train(cfg)
    assert exit_.value.code == 2 and not marker.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    _one_line_naming(err[0], folder, key)
    assert not (tmp_path / "run").exists()


def test_payload_never_runs_through_scripts_train_py(tmp_path):
    folder, marker, key = _planted(tmp_path, "nonlin")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("SEGADAPT_DEBUG", None)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *_train_argv(tmp_path, folder)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert not marker.exists(), "the plans file ran code"
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), done.stderr[-2000:]
    _one_line_naming(err[0], folder, key)
    assert not (tmp_path / "run").exists()


def _edited(tmp: Path, **changes) -> Path:
    folder, _ = write_results(tmp / "results")
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"].update(changes)
    (folder / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    return folder


def _plain_unet_parameters(f: int) -> int:
    """Parameters of the fixture's 3-stage PlainConvUNet (2 channels in, 2 classes) with f features per stage,
    counted by hand: convs (3^3 kernels, bias), affine instance norms, transposed convs (2^3 kernels, bias),
    1x1x1 segmentation heads (one per decoder stage: deep supervision)."""
    k = 27
    encoder = (2 * f * k + f) + 5 * (f * f * k + f)  # stage 0: 2 -> f, f -> f; stages 1, 2: f -> f twice
    decoder = 2 * ((2 * f) * f * k + f) + 2 * (f * f * k + f)  # per stage: skip + up (2f) -> f, f -> f
    norms = 10 * 2 * f
    transposed = 2 * (f * f * 8 + f)
    heads = 2 * (f * 2 + 2)
    return encoder + decoder + norms + transposed + heads


def test_absurd_features_are_refused_from_the_shapes_before_anything_is_allocated(tmp_path):
    small = build_nnunet(str(_edited(tmp_path / "small", features_per_stage=[4, 4, 4])))
    assert sum(p.numel() for p in small.parameters()) == _plain_unet_parameters(4)  # the formula is right
    folder = _edited(tmp_path, features_per_stage=[65536, 65536, 65536])
    expected = _plain_unet_parameters(65536)
    assert expected * 4 > 400 * 2**30 and expected > MAX_PARAMETERS  # float32 weights alone: > 400 GiB
    with pytest.raises(ValueError) as info:
        build_nnunet(str(folder))  # a real build would raise torch's out-of-memory RuntimeError, not this
    message = str(info.value)
    _one_line_naming(message, folder, "architecture.arch_kwargs")
    assert f"PlainConvUNet of {expected:,} parameters" in message and f"limit of {MAX_PARAMETERS:,}" in message


@pytest.mark.parametrize("changes, expected", [
    ({"n_stages": 10**6}, "arch_kwargs.n_stages: 1000000 (each an integer 0..64)"),
    ({"n_conv_per_stage": [2, 10**6, 2]}, "arch_kwargs.n_conv_per_stage: [2, 1000000, 2]"),
    ({"features_per_stage": "many"}, "arch_kwargs do not build a PlainConvUNet"),
    ({"kernel_sizes": [[3, 3]] * 3}, "arch_kwargs do not run on the patch size [16, 16, 16]"),
    ({"strides": [[1, 1, 1], [2, 2, 2], [3, 3, 3]]}, "arch_kwargs do not run on the patch size [16, 16, 16]"),
    ({"nonlin_kwargs": {"no_such_argument": 1}}, "arch_kwargs do not build a PlainConvUNet"),
])
def test_arch_kwargs_that_do_not_build_are_one_line(tmp_path, changes, expected):
    folder = _edited(tmp_path, **changes)
    with pytest.raises(ValueError) as info:
        read_results(folder)
    _one_line_naming(str(info.value), folder, "architecture")
    assert expected in str(info.value)


def test_the_names_nnunet_writes_map_to_the_allow_listed_classes():
    assert NETWORK_CLASSES["dynamic_network_architectures.architectures.unet.PlainConvUNet"].__name__ == "PlainConvUNet"
    for short, full, cls in [("torch.nn.Conv3d", "torch.nn.modules.conv.Conv3d", torch.nn.Conv3d),
                             ("torch.nn.InstanceNorm3d", "torch.nn.modules.instancenorm.InstanceNorm3d",
                              torch.nn.InstanceNorm3d),
                             ("torch.nn.LeakyReLU", "torch.nn.modules.activation.LeakyReLU", torch.nn.LeakyReLU),
                             ("torch.nn.Dropout3d", "torch.nn.modules.dropout.Dropout3d", torch.nn.Dropout3d)]:
        assert OP_CLASSES[short] is OP_CLASSES[full] is cls
    assert ARCH_KWARGS["conv_op"] in OP_CLASSES and ARCH_KWARGS["nonlin"] in OP_CLASSES
    assert all(isinstance(c, type) and issubclass(c, torch.nn.Module) for c in [*NETWORK_CLASSES.values(),
                                                                              *OP_CLASSES.values()])
