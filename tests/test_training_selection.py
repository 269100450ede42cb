"""Model selection without leakage: the selection callback, the inner split in the data module, and fit_run's
metrics.json (selected and last network, inner-Dice curve, the flag for runs below the unadapted base)."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from safetensors.torch import save_file

from segadapt.data import load_or_create_splits, make_phantom_dataset
from segadapt.models import build_model
from segadapt.runs import ADAPTER_FILE, METRICS_FILE
from segadapt.training import RunConfig, SegDataModule, SelectBest, fit_run, load_run
from segadapt.training.jobs import format_result

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
           "num_sanity_val_steps": 0, "log_every_n_steps": 1}


class _Scripted(pl.LightningModule):
    """One weight w; each step of SGD (lr 0.1) on the loss w lowers it by 0.1, so w = -0.1 * step. Validation
    logs the next of the scripted scores as val/dice."""

    def __init__(self, scores, sd=None, n_cases=None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.register_buffer("frozen", torch.ones(3))
        self.scores, self.checks, self.sd, self.n_cases = list(scores), 0, sd, n_cases

    def training_step(self, batch, batch_idx):
        return self.w * 1.0

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.log("val/dice", float(self.scores[self.checks]))
        if self.sd is not None:  # as SegAdaptModule logs them: the sd over cases and the number of cases
            self.log_dict({"val/dice_sd": float(self.sd), "val/n_cases": float(self.n_cases)})
        self.checks += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(3, 1)), batch_size=1)

    val_dataloader = train_dataloader


def _fit(module, callbacks, max_steps):
    trainer = pl.Trainer(max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                         enable_checkpointing=False, callbacks=callbacks, **TRAINER)
    trainer.fit(module)
    return trainer


def test_select_best_keeps_the_state_of_the_best_inner_dice():
    selector = SelectBest()
    module = _Scripted([0.1, 0.5, 0.3, 0.5, 0.2])  # checks at steps 2, 4, 6, 8, 10; no sd: ties go to the later step
    _fit(module, [selector], max_steps=10)
    assert selector.curve == [{"step": s, "dice": pytest.approx(d), "se": 0.0} for s, d in zip((2, 4, 6, 8, 10), module.scores)]
    assert selector.best_step == 8 and selector.best_score == pytest.approx(0.5)
    assert float(module.w) == pytest.approx(-1.0)  # the last network
    assert set(selector.best_state) == {"w", "frozen"}  # trainable parameters and buffers, no frozen parameter
    selector.restore(module)
    assert float(module.w) == pytest.approx(-0.8)  # the network of step 8
    again = SelectBest()
    again.load_state_dict(selector.state_dict())  # what a resumed run reads from last.ckpt
    assert again.curve == selector.curve and again.best_step == 8 and torch.equal(again.best_state["w"], module.w.data)


@pytest.mark.parametrize("scores,selected", [
    ([0.1, 0.5, 0.47, 0.3, 0.465], 10),  # 0.465 >= 0.5 - 0.08/sqrt(4): the latest step within one SE of the best
    ([0.1, 0.5, 0.47, 0.3, 0.45], 6),  # the last step fell more than one SE below the best: step 6 (0.47) stays
    ([0.1, 0.5, 0.2, 0.9, 0.85], 8),  # a new best (0.9) moves the reference: 0.85 is more than one SE below it
])
def test_selection_takes_the_latest_step_within_one_standard_error_of_the_best(scores, selected):
    selector = SelectBest()
    module = _Scripted(scores, sd=0.08, n_cases=4)  # standard error 0.04
    _fit(module, [selector], max_steps=10)
    assert [c["se"] for c in selector.curve] == [pytest.approx(0.04)] * 5
    assert selector.best_step == selected and selector.best_score == pytest.approx(scores[selected // 2 - 1])
    selector.restore(module)
    assert float(module.w) == pytest.approx(-0.1 * selected)


def test_early_stopping_counts_inner_validations():
    selector = SelectBest()
    module = _Scripted([0.1, 0.5, 0.3, 0.2, 0.9, 0.9])
    trainer = _fit(module, [selector, EarlyStopping("val/dice", mode="max", patience=2)], max_steps=12)
    assert [c["step"] for c in selector.curve] == [2, 4, 6, 8]  # two checks without improvement after step 4
    assert trainer.global_step == 8 and selector.best_step == 4


# ---- fit_run on a tiny phantom ----------------------------------------------------------------------
KWARGS = {"in_channels": 3, "out_channels": 1, "channels": [4, 8], "strides": [2], "num_res_units": 0}
PREPROCESS = {"windows": [[40, 80], [80, 200], [600, 2800]], "slice_size": [32, 32], "samples_per_volume": 2,
              "cache": "memory"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection")
    dataset = make_phantom_dataset(root / "sah", domain="sah", n=8, shape=(32, 32, 16), spacing=(6.9, 6.9, 10.0))
    torch.manual_seed(1)
    net = build_model("multiview_unet", **KWARGS)
    base = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(base))
    return dataset, base


def _kwargs(phantom, **data):
    dataset, base = phantom
    module = {"model": "multiview_unet", "model_kwargs": KWARGS, "base_checkpoint": str(base),
              "adapter": {"method": "lora_c", "rank": 2}, "lr": 0.05}
    datamodule = {"dataset_json": str(dataset), "fold": 0, "n_folds": 2, "preprocess": PREPROCESS, "batch_size": 1,
                  **data}
    return module, datamodule


def test_inner_cases_come_from_the_fold_training_cases_and_are_validated_while_fitting(phantom):
    _, datamodule_kwargs = _kwargs(phantom, inner_fraction=0.25, max_train_cases=2)
    datamodule = SegDataModule(**datamodule_kwargs)
    datamodule.setup()
    splits = load_or_create_splits(phantom[0], n_folds=2, seed=0)
    train_ids = {d["case_id"] for d in datamodule.train_set.data}
    inner, val = set(datamodule.inner_case_ids), {d["case_id"] for d in datamodule.val_set.data}
    assert val == set(splits.val_ids(0)) and len(inner) == 1 and len(train_ids) == 2
    assert inner | train_ids <= set(splits.train_ids(0)) and not inner & train_ids
    assert datamodule.val_pipeline is datamodule.inner_set.transform  # scored through one pipeline
    plain = SegDataModule(**{**datamodule_kwargs, "inner_fraction": 0.0, "max_train_cases": None})
    plain.setup()
    assert {d["case_id"] for d in plain.train_set.data} == set(splits.train_ids(0)) and plain.inner_set is None
    with pytest.raises(ValueError, match="no inner validation split"):
        with plain.inner_validation():
            pass


class _ScriptInnerDice(pl.Callback):
    """At each check while fitting, gives every validated case a scripted Dice (in the module's rows before it
    logs them, so SelectBest reads the scripted mean), and records the validated cases and the adapter."""

    def __init__(self, scores) -> None:
        self.scores, self.validated, self.states = dict(scores), [], {}

    def on_validation_epoch_end(self, trainer, pl_module):  # Lightning calls this before the module's own hook
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.validated.append({r["case_id"] for r in pl_module._rows})
            for row in pl_module._rows:
                row["dice"] = self.scores[trainer.global_step]
            self.states[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.net.named_parameters()
                                                if v.requires_grad}


@pytest.mark.parametrize("scores, selected", [({2: 0.9, 4: 0.1}, 2), ({2: -1.0, 4: -0.5}, 4)])
def test_fit_run_reports_the_selected_and_the_last_network(phantom, tmp_path, scores, selected):
    module_kwargs, datamodule_kwargs = _kwargs(phantom, inner_fraction=0.34)
    script = _ScriptInnerDice(scores)
    result = fit_run(RunConfig(tmp_path, {"experiment": "t", "method": "lora_c", "fold": 0}, module_kwargs, datamodule_kwargs,
                               {**TRAINER, "max_steps": 4, "val_check_interval": 2, "check_val_every_n_epoch": None},
                               eval_base=False), callbacks=[script])
    stored = json.loads((tmp_path / METRICS_FILE).read_text(encoding="utf-8"))
    selection = stored["selection"]
    inner = set(selection["inner_cases"])
    val = set(load_or_create_splits(phantom[0], n_folds=2, seed=0).val_ids(0))
    assert len(inner) == 1 and not inner & val
    assert script.validated == [inner, inner]  # while fitting only the inner case was scored
    assert {c["case_id"] for c in stored["cases"]} == val == {c["case_id"] for c in stored["last_cases"]}
    assert selection["curve"] == [{"step": s, "dice": pytest.approx(scores[s], abs=1e-6), "se": 0.0} for s in (2, 4)]  # one inner case
    assert selection["selected_step"] == selected and stored["global_step"] == 4
    assert selection["selected_dice"] == pytest.approx(scores[selected])
    assert 0.0 <= stored["base_inner_dice"] <= 1.0
    assert selection["below_base"] == (scores[selected] < stored["base_inner_dice"])
    assert stored["val"]["dice"] == pytest.approx(np.mean([c["dice"] for c in stored["cases"]]))
    assert stored["val_last"]["dice"] == pytest.approx(np.mean([c["dice"] for c in stored["last_cases"]]))
    assert (tmp_path / ADAPTER_FILE).is_file()
    saved = dict(load_run(tmp_path)[0].net.named_parameters())  # the selected network's adapter, not the last one's
    for name, value in script.states[selected].items():
        torch.testing.assert_close(saved[name], value)
    moved = [not torch.equal(script.states[2][k], script.states[4][k]) for k in script.states[2]]
    assert any(moved)  # the two candidates differ, so the check above tells them apart
    text = format_result(result, tmp_path)
    assert f"model selection: step {selected} of 4" in text
    assert ("WARNING" in text) == selection["below_base"]


def test_without_an_inner_split_nothing_is_validated_while_fitting(phantom, tmp_path):
    module_kwargs, datamodule_kwargs = _kwargs(phantom, inner_fraction=0.0)
    script = _ScriptInnerDice({})
    result = fit_run(RunConfig(tmp_path, {"experiment": "t", "method": "lora_c", "fold": 0}, module_kwargs, datamodule_kwargs,
                               {**TRAINER, "max_steps": 2, "val_check_interval": 1, "check_val_every_n_epoch": None},
                               eval_base=False), callbacks=[script])
    assert script.validated == [] and result["selection"] is None and result["base_inner_dice"] is None
    assert result["val"] == result["val_last"] and result["cases"] == result["last_cases"]
    assert "model selection" not in format_result(result, tmp_path)
