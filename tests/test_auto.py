"""``segadapt auto`` on a tiny phantom: the nesting (no trial loads a fold's validation cases, read from the
data modules the trials built), the choice per fold (one standard error, recomputed from the record), the
record (auto.json against the run folders), a search killed with SIGKILL mid-trial and resumed (finished
trials are not rerun, the killed trial's run folder resumes), and bad input (one line, nothing written)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from run_fixtures import tiny_phantom

from segadapt.runs import read_metrics
from segadapt.training import SegDataModule
from segadapt.training import auto
from segadapt.training.auto import main as auto_main
from segadapt.training.auto_study import choose

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore::optuna.exceptions.ExperimentalWarning")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = tiny_phantom("trainer.max_steps=4", "trainer.threads=1", "model.kwargs.channels=[4,8]", "model.kwargs.strides=[2]",
                    "selection.every_n_steps=2", "checkpoint_every=2")
SPACE = ["auto.methods=[lora_c,cp_lora,full]", "auto.ranks=[2,4]", "auto.startup_trials=2"]


def _argv(root: Path, *more: str, runs: str = "runs") -> list[str]:
    return ["--config-dir", str(CONFIGS), *TINY, f"paths.data={root}/data", f"paths.runs={root}/{runs}", *SPACE, *more]


def _outer_folds(root: Path) -> list[list[str]]:
    """The validation case ids of each outer fold, read from the experiment's own splits file."""
    return [sorted(f["val"]) for f in json.loads((root / "data/phantom_sah/splits_3fold_seed0.json").read_text())]


def _ids(dataset) -> list[dict]:
    return [] if dataset is None else [{"case_id": d["case_id"], "image": str(d["image"])} for d in dataset.data]


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> dict:
    """A 3-trial search of folds 0 and 1, with every data module the runs set up recorded (the cases it loaded)."""
    root = tmp_path_factory.mktemp("auto")
    loaded, modules, setup = [], [], SegDataModule.setup

    def recording_setup(self, stage=None):
        setup(self, stage)
        if self.val_set is not None and not any(m is self for m in modules):  # once per data module
            modules.append(self)
            loaded.append({"dataset": str(Path(self.hparams.dataset_json).resolve()), "fold": self.hparams.fold,
                           "sets": {k: _ids(getattr(self, f"{k}_set")) for k in ("train", "val", "inner")}})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SegDataModule, "setup", recording_setup)
        record = auto_main(_argv(root, "--trials", "3", "--folds", "0,1"))
    return {"root": root, "record": record, "loaded": loaded}


def test_no_trial_loads_a_validation_case(searched):
    root, loaded = searched["root"], searched["loaded"]
    outer = _outer_folds(root)
    images = {c["case_id"]: c["image"] for entry in loaded for s in entry["sets"].values() for c in s}
    for fold in (0, 1):
        data = str((root / f"runs/phantom_sah/auto/fold{fold}/data/dataset.json").resolve())
        trials = [e for e in loaded if e["dataset"] == data]
        assert len(trials) == 3  # one data module per trial
        for trial in trials:
            cases = [c for s in trial["sets"].values() for c in s]
            assert {c["case_id"] for c in cases}.isdisjoint(outer[fold])
            assert {c["image"] for c in cases}.isdisjoint({images[c] for c in outer[fold] if c in images})
            assert len({c["case_id"] for c in cases}) == 6 - len(outer[fold])  # every training patient, no more
        final = [e for e in loaded if e["dataset"] != data and e["fold"] == fold and "phantom_sah/dataset.json" in e["dataset"]]
        assert [sorted(c["case_id"] for c in e["sets"]["val"]) for e in final] == [outer[fold]]


def test_record_and_choice(searched):
    root, record = searched["root"], searched["record"]
    assert json.loads((root / "runs/phantom_sah/auto.json").read_text()) == json.loads(json.dumps(record))
    outer = _outer_folds(root)
    for fold_record in record["folds"]:
        fold = fold_record["fold"]
        trials = fold_record["trials"]
        assert len(trials) == 3 and {t["state"] for t in trials} <= {"COMPLETE", "PRUNED", "FAIL"}
        for trial in trials:
            metrics = read_metrics(trial["run_dir"])  # each trial is a finished ordinary run folder
            assert trial["cases"]["inner"] == [c["case_id"] for c in metrics["cases"]]
            assert set(trial["cases"]["inner"]).isdisjoint(outer[fold])
            assert trial["cases"]["inner"] == fold_record["cases"]["inner"]
            assert trial["curve"] == [{"step": c["step"], "dice": c["dice"]} for c in metrics["selection"]["curve"]]
            assert trial["inner_dice"] == metrics["val"]["dice"]
            assert trial["value"] == (metrics["val"]["dice"] if trial["state"] == "COMPLETE" else None)
            if trial["state"] == "COMPLETE":
                assert trial["se"] == pytest.approx(metrics["val"]["dice_sd"] / math.sqrt(metrics["val"]["n_cases"])
                                                    if metrics["val"]["n_cases"] > 1 else 0.0)
                assert trial["trainable_params"] == metrics["cost"]["trainable_params"]
        # the one-standard-error rule, recomputed: the fewest parameters within one SE of the best
        done = [t for t in trials if t["state"] == "COMPLETE"]
        best = max(done, key=lambda t: t["value"])
        within = [t for t in done if t["value"] >= best["value"] - best["se"]]
        expected = min(within, key=lambda t: (t["trainable_params"], -t["value"], t["number"]))
        assert fold_record["chosen"]["number"] == expected["number"]
        final = read_metrics(root / f"runs/phantom_sah/multiview_unet/auto/fold{fold}")
        assert final["run"]["method"] == "auto" and final["run"]["fold"] == fold
        assert sorted(c["case_id"] for c in final["cases"]) == outer[fold]
        assert fold_record["outer"]["dice"] == final["val"]["dice"]
        assert final["cost"]["trainable_params"] == expected["trainable_params"]  # the chosen configuration trained


def test_one_standard_error_rule():
    dist = {"method": CategoricalDistribution(["a", "b", "c"])}

    def trial(number, method, value, se, params):
        made = create_trial(value=value, params={"method": method}, distributions=dist,
                            user_attrs={"se": se, "trainable_params": params})
        made.number = number
        return made

    trials = [trial(0, "a", 0.80, 0.05, 1000), trial(1, "b", 0.78, 0.02, 100), trial(2, "c", 0.70, 0.01, 10)]
    assert choose(trials, "one_se", 0).number == 1  # 0.78 >= 0.80 - 0.05, fewer parameters than trial 0
    assert choose(trials, "best", 0).number == 0
    failed = create_trial(state=TrialState.FAIL, user_attrs={"error": "rank 9 too large"})
    with pytest.raises(ValueError, match=r"no trial of fold 3 finished \(errors: rank 9 too large\)"):
        choose([failed], "one_se", 3)


KILL_AT_TRIAL_1 = textwrap.dedent("""
    import os, signal, sys
    from segadapt.training import auto
    report = auto.InnerDiceReport.on_validation_end
    def killing(self, trainer, pl_module):  # SIGKILL in trial 1, after its last.ckpt of step 2
        report(self, trainer, pl_module)
        if self.trial.number == 1 and trainer.global_step >= 4:
            os.kill(os.getpid(), signal.SIGKILL)
    auto.InnerDiceReport.on_validation_end = killing
    auto.main(sys.argv[1:])
""")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_search_resumes(tmp_path, capsys, monkeypatch):
    argv = _argv(tmp_path, "--trials", "3", "--folds", "0", "trainer.max_steps=6")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILL_AT_TRIAL_1, *argv], env=env, capture_output=True, text=True,
                            timeout=900)
    assert killed.returncode == -9, killed.stderr[-2000:]
    trials_dir = tmp_path / "runs/phantom_sah/auto/fold0"
    first = trials_dir / "trial000/metrics.json"
    before = _digest(first)
    assert (trials_dir / "trial001/last.ckpt").is_file() and not (trials_dir / "trial001/metrics.json").exists()
    assert optuna.load_study(study_name="fold0", storage=f"sqlite:///{trials_dir.parent / 'study.sqlite'}") \
        .get_trials()[1].state == TrialState.RUNNING

    runs = []
    train = auto.train
    monkeypatch.setattr(auto, "train", lambda cfg, **kw: runs.append(cfg["run_dir"]) or train(cfg, **kw))
    record = auto_main(argv)
    trials = record["folds"][0]["trials"]
    assert [t["state"] for t in trials[:2]] == ["COMPLETE", "INTERRUPTED"]
    retry = trials[2]
    assert retry["retry_of"] == 1 and retry["params"] == trials[1]["params"]
    assert retry["run_dir"] == str(trials_dir / "trial001") and retry["state"] in ("COMPLETE", "PRUNED")
    assert "resuming" in capsys.readouterr().out  # trial001 went on from its last.ckpt
    assert read_metrics(trials_dir / "trial001")["global_step"] == 6
    assert _digest(first) == before and str(trials_dir / "trial000") not in runs  # the finished trial not rerun
    assert len([t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]) == 3  # the budget counts finished ones
    assert runs[-1].endswith("multiview_unet/auto/fold0") and len(runs) == 3  # the retry, one new trial, the final run
    # the same command once more: nothing is trained again
    runs.clear()
    auto_main(argv)
    assert runs == []


AUTO_CASES = [
    ("no budget", [], r"give a budget: --trials N"),
    ("unknown method", ["--trials", "2", "auto.methods=[lora_c,no_such]"], r"auto\.methods: no adapter config 'no_such'"),
    ("method that adapts nothing", ["--trials", "2", "auto.methods=[none]"], r"auto\.methods: 'none' does not adapt"),
    ("empty ranks", ["--trials", "2", "auto.ranks=[]"], r"auto\.ranks must be a non-empty list"),
    ("unknown space key", ["--trials", "2", "auto.rankz=[4]"], r"auto\.rankz: unknown key of the search space"),
    ("bad rule", ["--trials", "2", "auto.rule=median"], r"auto\.rule must be one of one_se, best"),
    ("bad lr range", ["--trials", "2", "auto.lr_factor=[3,0.3]"], r"auto\.lr_factor must be \[low, high\]"),
    ("fold set by hand", ["--trials", "2", "fold=1"], r"fold=1: segadapt auto sets the fold"),
    ("fold out of range", ["--trials", "2", "--folds", "0,5"], r"--folds \[0, 5\]: folds of data\.n_folds=3"),
    ("unknown preset", ["--trials", "2", "auto.placements={x: {preset: nowhere}}"],
     r"auto\.placements\.x\.preset: multiview_unet has no preset 'nowhere'"),
    ("unknown run setting", ["--trials", "2", "no_such_key=1"], r"Could not override 'no_such_key'"),
    ("run setting of wrong type", ["--trials", "2", "trainer.max_steps=x"], r"trainer\.max_steps='x': expected an integer"),
]


@pytest.mark.parametrize("name, argv, message", AUTO_CASES, ids=[c[0] for c in AUTO_CASES])
def test_bad_input_is_one_line_and_writes_nothing(searched, capsys, name, argv, message):
    root = searched["root"]
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    with pytest.raises(SystemExit) as exit_:
        auto_main(_argv(root, *argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_trial_folders_without_their_study_are_refused(searched, capsys):
    root = searched["root"]
    study = root / "runs/phantom_sah/auto/study.sqlite"
    study.rename(study.with_suffix(".aside"))
    try:
        before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
        with pytest.raises(SystemExit) as exit_:
            auto_main(_argv(root, "--trials", "3", "--folds", "0,1"))
        assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    finally:
        study.with_suffix(".aside").rename(study)
    assert exit_.value.code == 2
    assert re.fullmatch(r"error: .*auto/fold0/trial000: trial folders of a search whose study \(.*study\.sqlite\) is "
                        r"gone; delete .*auto to start anew", capsys.readouterr().err.strip())


def test_timeout_budget(searched):
    """--timeout alone: trials start until that many seconds of the fold's search have passed, then the choice."""
    root = searched["root"]
    record = auto_main(_argv(root, "--timeout", "8", "--folds", "0", runs="timed"))
    storage = f"sqlite:///{root / 'timed/phantom_sah/auto/study.sqlite'}"
    trials = optuna.load_study(study_name="fold0", storage=storage).get_trials()
    started = [t.datetime_start for t in trials]
    assert len(trials) >= 1 and len(record["folds"][0]["trials"]) == len(trials)
    assert all((s - started[0]).total_seconds() < 8 for s in started)  # none started after the timeout
    assert record["folds"][0]["outer"]["dice"] == read_metrics(root / "timed/phantom_sah/multiview_unet/auto/fold0")["val"]["dice"]


def test_resume_with_other_settings_is_refused(searched, capsys):
    """A study continues only with the run settings and search space it began with (the budget may change)."""
    root = searched["root"]
    with pytest.raises(SystemExit) as exit_:
        auto_main(_argv(root, "--trials", "4", "--folds", "0,1", "trainer.max_steps=5"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: .*study\.sqlite: fold 0's study was made with other settings \(overrides: .*"
                        r"'trainer\.max_steps=5'\]\); run it with its own, or delete .*auto to start anew", err), err
