"""SegAdaptModule: what each baseline and adapter trains, the loss and optimiser, and bad configurations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from safetensors.torch import save_file

from segadapt.adapters import adapted_layers, regularization_loss
from segadapt.data import load_dataset_json, make_phantom_dataset, remap_label_file
from segadapt.models import build_model, preset_targets
from segadapt.training import SegAdaptModule, SegDataModule, TrainStats, tuning_name
from segadapt.training.module import check_classes

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


class _BigValidation(pl.LightningModule):
    """A tiny training step and a validation step that holds `validation_mb` of memory for a moment."""

    def __init__(self, validation_mb: int) -> None:
        super().__init__()
        self.layer, self.validation_mb = torch.nn.Linear(4, 1), validation_mb

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        held = torch.ones(self.validation_mb * 2**20 // 4)  # float32, pages touched
        self.log("val/held", held.sum())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)

    val_dataloader = train_dataloader


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_train_stats_peak_memory_leaves_out_validation_inside_fit():
    """400 MB held by each validation round inside fit (sanity check and mid-training) are not training's peak."""
    stats = TrainStats()
    trainer = pl.Trainer(accelerator="cpu", max_steps=8, val_check_interval=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[stats])
    trainer.fit(_BigValidation(400))
    assert stats.stats["train_steps"] == 8 and stats.stats["memory"] == "cpu_rss"
    assert stats.stats["peak_mem_increase_mb"] < 200


def test_validation_scores_each_case_on_its_file_grid(base, tmp_path):
    """Preprocessing resamples to a coarser spacing; the rows still hold the label file's lesion volume
    (count x file voxel volume) and a prediction mapped back onto the file's voxels."""
    dataset = make_phantom_dataset(tmp_path / "sah", domain="sah", n=4, shape=(32, 32, 16), spacing=(6.9, 6.9, 10.0))
    preprocess = {"windows": [[40, 80], [80, 200], [600, 2800]], "target_spacing": [9.0, 9.0, 12.0],
                  "slice_size": [32, 32], "cache": "none"}
    datamodule = SegDataModule(str(dataset), fold=0, n_folds=2, preprocess=preprocess)
    module = _module(base, "none", threshold=0.5)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    assert len(module.case_rows) == 2
    for row in module.case_rows:
        label = nib.load(tmp_path / "sah" / "labelsTr" / f"{row['case_id']}.nii.gz")
        file_ml = np.count_nonzero(np.asarray(label.dataobj)) * abs(np.linalg.det(label.affine[:3, :3])) / 1000
        assert row["true_ml"] == pytest.approx(file_ml, rel=1e-6)
        assert row["pred_ml"] / (6.9 * 6.9 * 10.0 / 1000) == pytest.approx(round(row["pred_ml"] / (6.9 * 6.9 * 10.0 / 1000)))
    # the preprocessed (resampled) labels hold other volumes: the file grid is what was scored
    resampled = [float((item["label"] > 0).sum()) * 9.0 * 9.0 * 12.0 / 1000 for item in datamodule.val_set]
    assert sorted(resampled) != pytest.approx(sorted(r["true_ml"] for r in module.case_rows), rel=1e-3)


def _relabelled_phantom(root: Path, mapping: dict[int, int], labels: dict[str, str]) -> Path:
    """A 4-case phantom whose label files hold `mapping`'s values and whose dataset.json declares `labels`."""
    dataset = make_phantom_dataset(root / "sah", domain="sah", n=4, shape=(32, 32, 16), spacing=(6.9, 6.9, 10.0))
    for label in sorted((root / "sah" / "labelsTr").glob("*.nii.gz")):
        remap_label_file(label, label, mapping)
    doc = json.loads(dataset.read_text(encoding="utf-8"))
    doc["labels"] = labels
    dataset.write_text(json.dumps(doc), encoding="utf-8")
    return dataset


def _tiny_fit(dataset: Path, module: SegAdaptModule, steps: int = 4) -> pl.Trainer:
    preprocess = {"slice_size": [32, 32], "cache": "none", "samples_per_volume": 2}
    datamodule = SegDataModule(str(dataset), fold=0, n_folds=2, preprocess=preprocess, batch_size=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_label_value_2_trains_a_binary_head_on_targets_0_and_1(tmp_path):
    """labels {0: background, 2: lesion} with out_channels=1: the loss sees the foreground as 1 (never 2, for
    which the sigmoid loss has no minimum), every training loss is finite and >= 0, and the loss of confident
    right logits is ~0 (the minimum), of confident wrong ones large."""
    dataset = _relabelled_phantom(tmp_path, {1: 2}, {"0": "background", "2": "lesion"})
    assert set(np.unique(np.asarray(nib.load(sorted((tmp_path / "sah/labelsTr").iterdir())[0]).dataobj))) == {0, 2}
    torch.manual_seed(0)
    module = SegAdaptModule(model="multiview_unet", model_kwargs=KWARGS, adapter="scratch", lr=0.01)
    targets, losses = [], []

    def record(loss_fn, args, out) -> None:
        targets.append(args[1].detach().clone())
        losses.append(float(out.detach()))

    module.loss_fn.register_forward_hook(record)
    trainer = _tiny_fit(dataset, module)
    seen = torch.unique(torch.cat([t.flatten() for t in targets])).tolist()
    assert seen == [0.0, 1.0], seen
    assert len(losses) == 4 and all(math.isfinite(v) and v >= 0 for v in losses), losses
    target = targets[0]
    right, wrong = module.loss_fn(1000 * (2 * target - 1), target), module.loss_fn(-1000 * (2 * target - 1), target)
    assert 0 <= float(right) < 1e-3 and float(wrong) > 100
    trainer.validate(module, datamodule=trainer.datamodule, verbose=False)  # the metrics count the value 2 as lesion
    assert len(module.case_rows) == 2
    for row in module.case_rows:
        label = nib.load(tmp_path / "sah" / "labelsTr" / f"{row['case_id']}.nii.gz")
        lesion_ml = np.count_nonzero(np.asarray(label.dataobj) == 2) * abs(np.linalg.det(label.affine[:3, :3])) / 1000
        assert lesion_ml > 0 and row["true_ml"] == pytest.approx(lesion_ml, rel=1e-6)


def test_three_classes_with_one_output_channel_are_refused(tmp_path):
    dataset = _relabelled_phantom(tmp_path, {1: 2}, {"0": "background", "1": "core", "2": "lesion"})
    module = SegAdaptModule(model="multiview_unet", model_kwargs=KWARGS, adapter="scratch")
    with pytest.raises(ValueError) as info:
        _tiny_fit(dataset, module, steps=1)
    message = str(info.value)
    assert "\n" not in message and str(dataset) in message and "declares 3 classes" in message
    assert "model.kwargs.out_channels=1" in message and "set model.kwargs.out_channels=3" in message
    description = load_dataset_json(dataset)
    check_classes(3, description)  # a 3-class head holds them
    with pytest.raises(ValueError, match="a 2-class head cannot hold them"):
        check_classes(2, description)
