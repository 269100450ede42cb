"""Several workers on one ``segadapt auto`` search (tiny phantom, 4 steps per trial): ``--workers 2`` runs every
trial exactly once in two processes within the budget and one of them trains the final run; a worker killed with
SIGKILL mid-trial while another works leaves its trial to the live one, which retries it from its ``last.ckpt``;
auto.json equals a fresh read of the storage (the bad --workers count: tests/test_auto.py AUTO_CASES);
the training items drawn without MONAI's metadata tracking hold the values drawn with it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch
import pytest
from optuna.trial import TrialState

from segadapt.runs import read_metrics
from segadapt.training import auto, auto_space
from segadapt.training.auto import main as auto_main
from segadapt.training.auto_workers import open_storage
from test_auto import KILL_AT_TRIAL_1, _argv  # tests/ is on sys.path

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore::optuna.exceptions.ExperimentalWarning")

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
KILL_AT_TRIAL_0 = KILL_AT_TRIAL_1.replace("self.trial.number == 1", "self.trial.number == 0")


def _trials(auto_dir: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="fold0", storage=open_storage(auto_dir)).get_trials()


def _pid(run_dir: str | Path) -> int:
    """The process that trained a run folder (its ``.lock`` keeps the pid of the last training)."""
    return int((Path(run_dir) / ".lock").read_text().split()[0])


def _search(argv: list[str]) -> auto.Search:
    """The Search a worker process of ``segadapt auto argv`` builds, with its storage open."""
    from segadapt.parsers import auto_parser

    args = auto_parser().parse_intermixed_args(argv)
    search = auto.Search(args.config_dir, [o for o in args.overrides if not o.startswith("auto.")],
                         [o[5:] for o in args.overrides if o.startswith("auto.")], None, args.trials, args.timeout,
                         args.folds)
    search.storage = open_storage(search.auto_dir)
    return search


def _fresh_record(root: Path, argv: list[str]) -> dict:
    """The record a new process reads from the storage now (auto.json's folds and summary)."""
    return _search(argv).record()


def test_two_workers_draw_other_trials_and_a_trial_s_draw_is_its_number_s(tmp_path):
    """Two workers (each its own Search, study object and sampler, one auto.seed) ask the trials of one fold in
    turn: no two trials are the same configuration (seeded once per process, both workers drew the same random
    start-up sequence, so a 2-worker search ran each configuration twice), and a start-up trial's draw is that
    of its number whichever worker asks (the same draw in a fresh in-memory study)."""
    (tmp_path / "runs/phantom_sah/auto").mkdir(parents=True)
    workers = [_search(_argv(tmp_path, "--trials", "6", "--folds", "0")) for _ in range(2)]
    studies = [w.study(0, w.fold_cases(0)) for w in workers]
    choices = []
    for number in range(6):
        trial = studies[number % 2].ask()
        assert trial.number == number
        choices.append(auto_space.draw(trial, workers[number % 2].space, 0))
    assert len({json.dumps(c, sort_keys=True) for c in choices}) == 6, choices
    alone = optuna.create_study(direction="maximize")
    startup = workers[0].space["startup_trials"]
    assert [auto_space.draw(alone.ask(), workers[1].space, 0) for _ in range(startup)] == choices[:startup]


def _check_record(root: Path, argv: list[str]) -> dict:
    written = json.loads((root / "runs/phantom_sah/auto.json").read_text())
    fresh = json.loads(json.dumps(_fresh_record(root, argv)))
    assert written["folds"] == fresh["folds"] and written["summary"] == fresh["summary"]
    final = read_metrics(root / "runs/phantom_sah/multiview_unet/auto/fold0")
    assert written["folds"][0]["outer"]["dice"] == final["val"]["dice"]  # complete: the final run scored
    return written


def test_two_workers_run_each_trial_once_within_the_budget(tmp_path):
    argv = _argv(tmp_path, "--trials", "2", "--folds", "0")
    done = subprocess.run([sys.executable, "-m", "segadapt.cli", "auto", *argv, "--workers", "2"], env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = _trials(tmp_path / "runs/phantom_sah/auto")
    assert len(trials) == 2 and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}  # the budget
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(run_dirs)) == 2 and sorted(Path(d).name for d in run_dirs) == ["trial000", "trial001"]
    for trial in trials:  # one training per trial: one summary line, a run trained from step 0 to the end
        assert len(re.findall(rf"auto fold 0 trial {trial.number}: ", done.stdout)) == 1
        metrics = read_metrics(trial.user_attrs["run_dir"])
        assert metrics["global_step"] == 4 and metrics["extended_from_steps"] is None
    assert "resuming" not in done.stdout
    # which worker ran which trial is up to the scheduler (a loaded machine may let the first worker claim both
    # before the second has imported torch); test_a_killed_worker_leaves_its_trial_to_the_live_one makes two
    # workers meet on one fold deterministically
    finals = re.findall(r"auto fold 0: chose trial (\d+)", done.stdout)
    assert len(finals) == 1  # one worker chose and trained the final run
    assert _pid(tmp_path / "runs/phantom_sah/multiview_unet/auto/fold0") in {_pid(d) for d in run_dirs}
    record = _check_record(tmp_path, argv)
    assert record["folds"][0]["chosen"]["number"] == int(finals[0])


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 600) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.5)


def test_a_killed_worker_leaves_its_trial_to_the_live_one(tmp_path, monkeypatch):
    """Worker K claims trial 0 and is killed (SIGKILL) at step 4 of 6; worker W, started meanwhile, runs trial 1,
    then finds trial 0 RUNNING with nobody holding its claim: it fails it, retries it from its last.ckpt (same
    parameters, same run folder) and trains the final run. The same command afterwards trains nothing."""
    argv = _argv(tmp_path, "--trials", "2", "--folds", "0", "trainer.max_steps=6")
    auto_dir = tmp_path / "runs/phantom_sah/auto"
    killed = subprocess.Popen([sys.executable, "-c", KILL_AT_TRIAL_0, *argv], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    _wait_for(auto_dir / "fold0/claims/trial000/.lock", killed)  # K holds trial 0
    worker = subprocess.Popen([sys.executable, "-m", "segadapt.cli", "auto", *argv], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    out, err = worker.communicate(timeout=900)
    killed.communicate(timeout=900)
    assert killed.returncode == -9 and worker.returncode == 0, err[-3000:]
    trials = _trials(auto_dir)
    assert len(trials) == 3 and trials[0].state == TrialState.FAIL and "error" not in trials[0].user_attrs
    assert {t.state for t in trials[1:]} <= {TrialState.COMPLETE, TrialState.PRUNED}  # the budget: 2 finished
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 0)  # trial 1 or 2: K may die before W asks
    assert retry.params == trials[0].params
    assert retry.user_attrs["run_dir"] == trials[0].user_attrs["run_dir"] == str(auto_dir / "fold0/trial000")
    assert "resuming" in out and read_metrics(auto_dir / "fold0/trial000")["global_step"] == 6
    pids = {_pid(t.user_attrs["run_dir"]) for t in trials[1:]} | {_pid(auto_dir.parent / "multiview_unet/auto/fold0")}
    assert pids == {worker.pid}  # W retried trial 0, ran the other trial and trained the final run
    _check_record(tmp_path, argv)
    runs = []
    train = auto.train
    monkeypatch.setattr(auto, "train", lambda cfg, **kw: runs.append(cfg["run_dir"]) or train(cfg, **kw))
    auto_main(argv)
    assert runs == []


@pytest.mark.parametrize("sampling, preprocess", [
    ("slice", {"slice_size": [32, 32], "samples_per_volume": 2, "cache": "memory"}),
    ("patch", {"patch_size": [32, 32, 16], "samples_per_volume": 2, "cache": "disk"}),
    ("slice", {"slice_size": [32, 32], "samples_per_volume": 2, "cache": "none"}),  # tracked: loaded per item
])
def test_training_items_are_plain_tensors_with_the_values_of_tracked_ones(tmp_path, sampling, preprocess):
    """Trial overhead: the random training transforms run without MONAI's metadata tracking (each MetaTensor
    operation copies the metadata and records itself); the items hold the same values as with it."""
    from monai.data import MetaTensor

    from segadapt.data import make_phantom_dataset
    from segadapt.training import SegDataModule
    from segadapt.training.datamodule import SeededItems, one_thread

    dataset = make_phantom_dataset(tmp_path / "sah", domain="sah", n=4, shape=(32, 32, 16), spacing=(6.9, 6.9, 10.0))
    preprocess = {"windows": [[40, 80], [80, 200], [600, 2800]], "cache_dir": str(tmp_path / "cache"), **preprocess}
    datamodule = SegDataModule(str(dataset), fold=0, n_folds=2, preprocess=preprocess, sampling=sampling)
    datamodule.setup("fit")
    items, dataset = SeededItems(datamodule.train_set), datamodule.train_set
    for index, seed in [(0, 11), (1, 12), (0, 13)]:
        plain = items[(index, seed)]
        with one_thread():
            dataset.transform.set_random_state(seed=seed)
            tracked = dataset[index]
        assert len(plain) == len(tracked) == 2
        for a, b in zip(plain, tracked):
            assert isinstance(b["image"], MetaTensor)
            assert isinstance(a["image"], MetaTensor) == isinstance(a["label"], MetaTensor) == (preprocess["cache"] == "none")
            assert torch.equal(a["image"], b["image"].as_tensor()) and torch.equal(a["label"], b["label"].as_tensor())
            assert a.get("view") == b.get("view")
