"""Resume of a *planned* run (``model=dynunet data=dataset_json``: the network's filters and kernels, the patch
and the batch are ``auto`` in the config, filled from the dataset plan): the resume compares the planned
request with the planned run (issue 23.5). And a resume with more steps trains on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from run_fixtures import run_script_in_process
from safetensors.torch import load_file

from segadapt.cli import check_hydra_request
from segadapt.data.phantom import make_phantom_dataset
from segadapt.runs import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, read_metrics
from segadapt.training import train
from segadapt.training.callbacks import LongerSchedule
from segadapt.training.jobs import check_request

from test_training_sweep import SWEEP_KILL_DRIVER  # noqa: E402 (tests/ is on sys.path; kills fold1 at step argv[1])

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

REPO = Path(__file__).resolve().parents[1]
STEPS, KILL_AT = 5, 3  # checkpoints at steps 2 and 4: the kill at step 3 resumes from step 2
UNTIMED = ("cost", "timing")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny phantom dataset.json and the overrides of a planned run on it (fold 1, so the kill driver kills it)."""
    root = tmp_path_factory.mktemp("planned")
    dataset = make_phantom_dataset(root / "data", "sah", n=6, shape=[32, 32, 16], spacing=[6.9, 6.9, 10.0])
    overrides = [
        "model=dynunet", "data=dataset_json", f"data.dataset_json={dataset}", "data.name=tiny",
        "adapter=scratch", f"base_checkpoint={root}/no_base/model.safetensors",  # plans the run's own dataset
        "plan.base_filters=4", "plan.memory_gb=1", "data.preprocess.samples_per_volume=1", "data.preprocess.intensity=zscore",
        "data.preprocess.cache=memory",
        "fold=1", "eval_base=false", "trainer.threads=1", "trainer.enable_progress_bar=false",
        f"trainer.max_steps={STEPS}", "checkpoint_every=2", f"plan.cache_dir={root}/plans",
    ]
    return {"root": root, "overrides": overrides}


def _cfg(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=overrides), resolve=True)


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("SEGADAPT_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _run(runs: Path) -> Path:
    return runs / "tiny/dynunet/scratch/fold1"


def _untimed(run: Path) -> dict:
    return {k: v for k, v in read_metrics(run).items() if k not in UNTIMED}


def _weights(run: Path) -> dict:
    return {k: v.tolist() for k, v in load_file(str(run / WEIGHTS_FILE)).items()}


@pytest.mark.parametrize("how", ["ckpt_path=last", "plain rerun"])
def test_a_killed_planned_run_resumes_bit_exactly(world, tmp_path, how):
    """SIGKILL at step 3 of a planned run, then ``scripts/train.py`` again (with ``ckpt_path=last``, or the same
    command): it resumes from step 2 and ends with the metrics (every case's Dice) and weights of the run that
    was never interrupted."""
    whole = _run(tmp_path / "whole")
    train(_cfg([*world["overrides"], f"paths.runs={tmp_path / 'whole'}"]))
    config = yaml.safe_load((whole / CONFIG_FILE).read_text(encoding="utf-8"))
    assert "auto" not in json.dumps(config["module"]) and isinstance(config["module"]["model_kwargs"]["filters"], list)

    command = [str(REPO / "scripts/train.py"), *world["overrides"], f"paths.runs={tmp_path / 'killed'}"]
    driver = tmp_path / "kill.py"
    driver.write_text(SWEEP_KILL_DRIVER, encoding="utf-8")
    done = _script(str(driver), str(KILL_AT), *command, cwd=tmp_path)
    killed = _run(tmp_path / "killed")
    assert done.returncode == -9, done.stderr[-3000:]
    assert (killed / CHECKPOINT_FILE).is_file() and not (killed / METRICS_FILE).exists()

    done = _script(*command, *(["ckpt_path=last"] if how == "ckpt_path=last" else []), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(killed)
    assert metrics["cost"]["resumed_from_step"] == 2 and metrics["global_step"] == STEPS
    assert _untimed(killed) == _untimed(whole)  # Dice of every case, exactly
    assert _weights(killed) == _weights(whole)


def test_a_planned_run_resumed_with_more_steps_trains_on(world, tmp_path, capsys, monkeypatch):
    """``ckpt_path=last trainer.max_steps=7`` on a finished 5-step planned run trains steps 5 and 6 from its
    checkpoint; config.yaml and metrics.json record 7 steps, extended from 5. Fewer steps are refused (both through
    scripts/train.py's checks and job, in this process: the planned resume is what is tested here)."""
    monkeypatch.delenv("SEGADAPT_DEBUG", raising=False)
    runs = f"paths.runs={tmp_path}"
    train(_cfg([*world["overrides"], runs]))
    run = _run(tmp_path)
    capsys.readouterr()
    code = run_script_in_process(REPO / "scripts/train.py", *world["overrides"], runs, "ckpt_path=last",
                                 "trainer.max_steps=4")
    err = capsys.readouterr().err
    assert code == 2 and "trainer.max_steps: 5 -> 4" in err, err[-2000:]
    old = tmp_path / "old"  # the run with a last.ckpt from before resumes could add steps
    shutil.copytree(run, old)
    checkpoint = torch.load(old / CHECKPOINT_FILE, weights_only=True)
    del checkpoint["callbacks"]["LongerSchedule"]
    torch.save(checkpoint, old / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match=r"does not say how many steps .* trainer\.max_steps: 5 -> 7 is refused"):
        check_request(_cfg([*world["overrides"], runs, f"run_dir={old}", "ckpt_path=last", "trainer.max_steps=7"]))
    longer = [*world["overrides"], runs, "ckpt_path=last", "trainer.max_steps=7"]
    check_hydra_request(REPO / "configs", "train", check_request, longer)  # what scripts/train.py checks first
    train(_cfg(longer))
    metrics = read_metrics(run)
    assert metrics["global_step"] == 7 and metrics["extended_from_steps"] == STEPS
    assert metrics["cost"]["resumed_from_step"] == STEPS
    assert yaml.safe_load((run / CONFIG_FILE).read_text(encoding="utf-8"))["trainer"]["max_steps"] == 7


class _Toy(pl.LightningModule):
    """A linear layer under segadapt's kind of schedule: linear warm-up over 2 steps, then cosine to the total."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), batch_size=4)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.1)
        total, warmup = int(self.trainer.estimated_stepping_batches), 2
        ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
        schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class _LearningRates(pl.Callback):
    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.by_step[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def _fit(tmp_path: Path, max_steps: int, callbacks: list, ckpt_path=None) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(_Toy(), ckpt_path=ckpt_path)
    return trainer


def test_more_steps_follow_the_schedule_of_the_new_total(tmp_path):
    """A 4-step fit resumed to 8 steps: steps 4-7 get the learning rates of an 8-step schedule (the restored
    4-step one would have ended at step 4), and the callback says it was extended from 4."""
    _fit(tmp_path, 4, [LongerSchedule()]).save_checkpoint(tmp_path / "last.ckpt")
    extended, longer = _LearningRates(), LongerSchedule()
    _fit(tmp_path, 8, [longer, extended], ckpt_path=tmp_path / "last.ckpt")
    fresh = _LearningRates()
    _fit(tmp_path, 8, [fresh])
    assert sorted(extended.by_step) == [4, 5, 6, 7] and longer.extended_from == 4
    assert extended.by_step == {step: fresh.by_step[step] for step in (4, 5, 6, 7)}
    assert len(set(extended.by_step.values())) == 4  # the rates move
