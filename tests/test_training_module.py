"""SegAdaptModule: what each baseline and adapter trains, the loss and optimiser, and bad configurations."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss
from safetensors.torch import save_file

from segadapt.adapters import adapted_layers, regularization_loss
from segadapt.models import build_model, preset_targets
from segadapt.training import SegAdaptModule, tuning_name

KWARGS = {"in_channels": 3, "out_channels": 1, "channels": [4, 8], "strides": [2], "num_res_units": 0}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    torch.manual_seed(1)
    net = build_model("multiview_unet", **KWARGS)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


class _FakeTrainer:
    """What configure_optimizers reads from a Trainer."""

    def __init__(self, steps: int) -> None:
        self.estimated_stepping_batches = steps


def _module(base: str, adapter, **kw) -> SegAdaptModule:
    return SegAdaptModule(model="multiview_unet", model_kwargs=KWARGS, base_checkpoint=base, adapter=adapter, **kw)


def _trainable(module: SegAdaptModule) -> set[str]:
    return {n for n, p in module.net.named_parameters() if p.requires_grad}


def test_baselines_train_the_right_parameters(base):
    everything = {n for n, _ in _module(base, "full").net.named_parameters()}
    assert _trainable(_module(base, "full")) == everything
    assert _trainable(_module(base, "none")) == set()
    decoder = _module(base, "decoder", preset="decoder")
    layers = preset_targets(build_model("multiview_unet", **KWARGS), "decoder")
    assert _trainable(decoder) == {n for n in everything if any(n.startswith(layer + ".") for layer in layers)}
    assert 0 < decoder.trainable_params < _module(base, "full").trainable_params


def test_pretrained_and_scratch_weights(base):
    stored = _module(base, "none").net.state_dict()
    torch.manual_seed(5)
    scratch = _module(None, "scratch").net.state_dict()
    assert all(torch.equal(stored[k], v) for k, v in _module(base, "full").net.state_dict().items())
    assert any(not torch.equal(stored[k], v) for k, v in scratch.items())


def test_adapter_trains_only_its_parameters_and_starts_at_the_base(base):
    module = _module(base, {"method": "cp_lora", "rank": 2}, preset="all_conv")
    assert _trainable(module) and all(".adapters." in n for n in _trainable(module))
    assert len(list(adapted_layers(module.net))) == len(preset_targets(build_model("multiview_unet", **KWARGS), "all_conv"))
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(module(x), _module(base, "none")(x))


def test_loss_is_monai_dice_ce_plus_weighted_regulariser(base):
    module = _module(base, {"method": "tlora", "rank": 2, "ring_rank": 2}, preset="all_conv", reg_weight=0.5)
    for p in module.parameters():  # move T away from the identity so the regulariser is nonzero
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(0)
    batch = {"image": torch.rand(2, 3, 16, 16), "label": (torch.rand(2, 1, 16, 16) > 0.8).float(), "view": torch.tensor([2, 0])}
    module.log = lambda *a, **k: None  # no trainer attached
    expected = DiceCELoss(sigmoid=True)(module(batch["image"], batch["view"]), batch["label"]) + 0.5 * regularization_loss(module.net)
    assert float(regularization_loss(module.net).detach()) > 0
    torch.testing.assert_close(module.training_step(batch, 0), expected)


def test_bad_configurations_are_clear_errors(base):
    with pytest.raises(ValueError, match="unknown baseline 'fancy'"):
        tuning_name("fancy")
    with pytest.raises(ValueError, match="base_checkpoint"):
        _module(None, "full")
    with pytest.raises(ValueError, match="preset"):
        _module(base, "decoder", preset=None)
    with pytest.raises(ValueError, match="unknown AdapterConfig fields"):
        _module(base, {"method": "cp_lora", "rnak": 4})
    with pytest.raises(FileNotFoundError):
        _module("/nonexistent/base.safetensors", "full")
    none = _module(base, "none")
    trainer = _FakeTrainer(10)
    none.trainer = trainer
    with pytest.raises(ValueError, match="no trainable parameter"):
        none.configure_optimizers()


def test_warmup_then_cosine_schedule(base):
    module = _module(base, "full", lr=1e-2, warmup_steps=4)
    trainer = _FakeTrainer(20)
    module.trainer = trainer
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4) and max(lrs) == pytest.approx(1e-2) and lrs.index(max(lrs)) == 4
    assert lrs[-1] < 1e-3 and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
