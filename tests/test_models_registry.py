"""The model registry: a new model is one network file and one config file, trained and predicted through the
normal path (Hydra config, train, run folder, segadapt predict), and every model-specific answer comes from its
ModelSpec."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from run_fixtures import tiny_phantom

from segadapt.cli import run as segadapt_main
from segadapt.plan.planner import Plan
from segadapt.models import MODELS, ModelSpec, build_model, head_modules, model_spec, preset_targets, register
from segadapt.models.registry import spec_of
from segadapt.runs import ADAPTER_FILE, read_run_config
from segadapt.training import load_run, train

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

REPO = Path(__file__).resolve().parents[1]
TOY = "toy_segnet_h4"  # the module's name is the model's name
BUILT_IN = ("dynunet", "unet3d", "unet2d", "multiview_unet", "nnunet", "sam", "vit_seg")

# The one network file a new model needs: the network and its spec.
MODEL_FILE = '''
from torch import nn

from segadapt.models.presets import split_presets
from segadapt.models.registry import ModelSpec, register


class ToyNet(nn.Module):
    def __init__(self, in_channels=1, out_channels=1, width=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(in_channels, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv3d(width, out_channels, 1)

    def forward(self, x):
        return self.head(self.body(x))


SPEC = register(ModelSpec(
    name=__name__, build=ToyNet, network_types=(ToyNet,), sampling="patch",
    presets=lambda net: split_presets(net, {"encoder": ["body"], "decoder": ["head"]}, "all_conv"),
    heads=lambda net: ["head"],
))
'''
# The one config file: configs/model/<name>.yaml, here in a folder of its own on Hydra's search path.
CONFIG_FILE = f'''
name: {TOY}
kwargs:
  out_channels: 1
  width: 4
inference:
  tta: false
  roi_size: null
  sw_batch_size: 2
  overlap: 0.25
'''
TINY = tiny_phantom("data.preprocess.patch_size=[16,16,8]", "source.preprocess.patch_size=[16,16,8]", "data.phantom.n=4",
                    "data.n_folds=2", "selection.inner_fraction=0", "eval_base=false")


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture()
def unregister_toy(monkeypatch):
    """The toy model is gone again after its test (its spec and its module)."""
    yield
    MODELS.pop(TOY, None)
    monkeypatch.delitem(sys.modules, TOY, raising=False)


def test_a_new_model_is_one_network_file_and_one_config_file(tmp_path, monkeypatch, capsys, unregister_toy):
    """A toy network written outside the package (one .py file) with its configs/model file (one .yaml) trains
    (its base pretrained, then a conv LoRA on the preset its spec names), and `segadapt predict` opens the run
    folder and segments a volume; nothing in the repository is touched."""
    code, configs = tmp_path / "code", tmp_path / "configs" / "model"
    code.mkdir()
    configs.mkdir(parents=True)
    (code / f"{TOY}.py").write_text(MODEL_FILE, encoding="utf-8")
    (configs / "toy.yaml").write_text(CONFIG_FILE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(code))
    before = {part: _tree(REPO / part) for part in ("segadapt", "configs")}

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "model=toy",
                                          "adapter=conv_lora", "adapter.preset=encoder", f"paths.data={tmp_path}/data",
                                          f"paths.runs={tmp_path}/runs", *TINY])
    result = train(OmegaConf.to_container(cfg, resolve=True))
    run = tmp_path / "runs" / "phantom_sah" / TOY / "conv_lora" / "fold0"
    assert (run / ADAPTER_FILE).is_file() and result["global_step"] == 2
    assert read_run_config(run)["datamodule"]["sampling"] == "patch"  # from the spec, not from the config file
    module, _ = load_run(run)
    assert type(module.net).__name__ == "ToyNet" and module.hparams.roi_size == [16, 16, 8]
    adapted = {name for name, m in module.net.named_modules() if type(m).__module__.startswith("segadapt.adapters")}
    assert adapted and all(name.startswith("body.") for name in adapted)  # the spec's 'encoder' preset only

    image = sorted((tmp_path / "data" / "phantom_sah").rglob("*.nii.gz"))[0]
    capsys.readouterr()
    rows = segadapt_main(["predict", "--run", str(run), "--input", str(image), "--output", str(tmp_path / "out"),
                          "--no-progress"])
    assert f"segadapt predict: {TOY} with 1 adapter(s)" in capsys.readouterr().out
    mask = nib.load(rows[0]["mask"])
    assert mask.shape == nib.load(image).shape and np.count_nonzero(mask.get_fdata()) == rows[0]["lesion_voxels"]
    assert {part: _tree(REPO / part) for part in ("segadapt", "configs")} == before


def test_every_model_answer_comes_from_its_spec():
    """Presets, heads, sampling and plan fields of the built-in models are their specs' own."""
    net = build_model("unet3d", channels=[4, 8], strides=[2])
    assert spec_of(net) is MODELS["unet3d"] and head_modules(net) == ["model.2"]
    assert preset_targets(net, "all_conv") == MODELS["unet3d"].presets(net)["all_conv"]
    assert {name: MODELS[name].sampling for name in BUILT_IN} == {
        "dynunet": "patch", "unet3d": "patch", "unet2d": "patch", "multiview_unet": "slice", "nnunet": "patch",
        "sam": "slice", "vit_seg": "slice"}
    plan = Plan(dataset="d", n_cases=2, modality={"0": "CT"}, spatial_dims=3, orientation="RAS",
                median_spacing=[1.0] * 3, target_spacing=[1.0] * 3, resample=False, anisotropic_axis=None,
                median_shape=[64] * 3, patch_size=[64, 64, 32], pools_per_axis=[2, 2, 1],
                strides=[[1, 1, 1], [2, 2, 2], [2, 2, 1]], kernel_sizes=[[3, 3, 3]] * 3, filters=[32, 64, 128],
                batch_size=2, slice_size=[64, 64], slice_pools=2, slice_filters=[32, 64, 128], slice_batch_size=12,
                intensity="ct", networks={"nnunet": {"out_channels": 2}})
    fields = plan.network_fields()
    assert fields["unet3d"] == {"channels": [32, 64, 128], "strides": [2, [2, 2, 1]]}
    assert fields["multiview_unet"] == {"channels": [32, 64, 128], "strides": [2, 2]}
    assert fields["dynunet"]["upsample_kernel_size"] == [[2, 2, 2], [2, 2, 1]] and fields["nnunet"] == {"out_channels": 2}
    assert set(fields) == {name for name, spec in MODELS.items() if spec.plan_fields} | {"nnunet"}


def test_registry_refusals():
    with pytest.raises(ValueError, match=r"unknown model 'unet4d'; valid models: .*multiview_unet"):
        model_spec("unet4d")
    with pytest.raises(ValueError, match="unknown model 'os'"):  # a module that registers no model of its name
        model_spec("os")
    with pytest.raises(ValueError, match="model 'unet3d' is already registered"):
        register(ModelSpec(name="unet3d", build=torch.nn.Identity, network_types=(torch.nn.Identity,),
                           sampling="patch", presets=lambda net: {}))
    with pytest.raises(ValueError, match=r"sampling must be one of \('slice', 'patch'\), got 'volume'"):
        ModelSpec(name="x", build=torch.nn.Identity, network_types=(), sampling="volume", presets=lambda net: {})
    with pytest.raises(TypeError, match="no adapter presets for Identity"):
        preset_targets(torch.nn.Identity(), "all")
    assert "unet4d" not in MODELS and np.all([spec.name == name for name, spec in MODELS.items()])
