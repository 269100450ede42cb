"""``segadapt auto`` on a tiny phantom: the nesting (no trial loads a fold's validation cases, read from the
data modules the trials built), the choice per fold (one standard error, recomputed from the record), the
record (auto.json against the run folders), a search killed with SIGKILL mid-trial and resumed (finished
trials are not rerun, the killed trial's run folder resumes), and bad input (one line, nothing written)."""

from __future__ import annotations

import csv
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
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from run_fixtures import tiny_phantom

from segadapt.runs import read_metrics
from segadapt.training import SegDataModule
from segadapt.training import auto
from segadapt.training.auto import main as auto_main
from segadapt.training.auto_study import choose
from segadapt.training.auto_workers import open_storage

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
    """A 3-trial search of folds 0 and 1, with every data module the runs set up and every loader they iterated
    recorded (:func:`_record_loading`)."""
    root = tmp_path_factory.mktemp("auto")
    loaded, served = [], []
    with pytest.MonkeyPatch.context() as patch:
        _record_loading(patch, loaded, served)
        record = auto_main(_argv(root, "--trials", "3", "--folds", "0,1", "auto.ensemble_rule=never"))
    return {"root": root, "record": record, "loaded": loaded, "served": served}


def _record_loading(patch: pytest.MonkeyPatch, loaded: list, served: list) -> None:
    """Record, for every SegDataModule, the cases of its sets once set up (`loaded`), and for every data loader it
    hands out the cases that loader iterates and the trainer's stage then (`served`: 'fit' = training and model
    selection, 'validate' = the scoring): what the runs actually load, not only how the sets were split."""
    setup, modules = SegDataModule.setup, []

    def recording_setup(self, stage=None):
        setup(self, stage)
        if self.val_set is not None and not any(m is self for m in modules):  # once per data module
            modules.append(self)
            loaded.append({"dataset": str(Path(self.hparams.dataset_json).resolve()), "fold": self.hparams.fold,
                           "sets": {k: _ids(getattr(self, f"{k}_set")) for k in ("train", "val", "inner")}})

    def recording(kind, hand_out):
        def loader(self):
            result = hand_out(self)
            dataset = getattr(result, "dataset", None)
            dataset = getattr(dataset, "dataset", dataset)  # the training loader's SeededItems wraps the train set
            served.append({"dataset": str(Path(self.hparams.dataset_json).resolve()), "fold": self.hparams.fold,
                           "loader": kind, "stage": None if self.trainer is None else self.trainer.state.fn.value,
                           "cases": [c["case_id"] for c in _ids(dataset)]})
            return result
        return loader

    patch.setattr(SegDataModule, "setup", recording_setup)
    for kind in ("train", "val"):
        patch.setattr(SegDataModule, f"{kind}_dataloader", recording(kind, getattr(SegDataModule, f"{kind}_dataloader")))


def _check_served(served: list, dataset: Path, outer: list, scored: int) -> None:
    """The loaders of the outer fold's runs on `dataset`: training and model selection never iterate the fold's
    validation cases `outer`; a scoring ('validate') iterates exactly them (at least `scored` such: each run's)
    or none of them (the selection split's base score)."""
    runs = [s for s in served if s["dataset"] == str(dataset.resolve())]
    fit = [s for s in runs if s["stage"] == "fit"]
    assert {s["loader"] for s in fit} == {"train", "val"} and all(s["cases"] for s in fit)
    for entry in fit:
        assert set(entry["cases"]).isdisjoint(outer), entry
    scorings = [sorted(s["cases"]) for s in runs if s["stage"] == "validate"]
    assert all(c == outer or set(c).isdisjoint(outer) for c in scorings), scorings
    assert scorings.count(outer) >= scored, scorings


def test_no_trial_loads_a_validation_case(searched):
    root, loaded = searched["root"], searched["loaded"]
    outer = _outer_folds(root)
    images = {c["case_id"]: c["image"] for entry in loaded for s in entry["sets"].values() for c in s}
    for fold in (0, 1):
        data = str((root / f"runs/phantom_sah/auto/fold{fold}/data/dataset.json").resolve())
        trials = [e for e in loaded if e["dataset"] == data]
        compared = searched["record"]["folds"][fold]["ensemble"] is not None  # the ensemble's inner scoring
        assert len(trials) == 3 + compared  # one data module per trial
        for trial in trials:
            cases = [c for s in trial["sets"].values() for c in s]
            assert {c["case_id"] for c in cases}.isdisjoint(outer[fold])
            assert {c["image"] for c in cases}.isdisjoint({images[c] for c in outer[fold] if c in images})
            assert len({c["case_id"] for c in cases}) == 6 - len(outer[fold])  # every training patient, no more
        final = [e for e in loaded if e["dataset"] != data and e["fold"] == fold and "phantom_sah/dataset.json" in e["dataset"]]
        assert [sorted(c["case_id"] for c in e["sets"]["val"]) for e in final] == [outer[fold]]
        for entry in (s for s in searched["served"] if s["dataset"] == data):  # what the trials' loaders iterated
            assert entry["cases"] and set(entry["cases"]).isdisjoint(outer[fold]), entry
        _check_served([s for s in searched["served"] if s["fold"] == fold], root / "data/phantom_sah/dataset.json",
                      outer[fold], scored=1)


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
        # the one-standard-error rule, recomputed: the fewest parameters among the trials the best beats by at most
        # the standard error of their per-case differences (the inner cases the trials' metrics.json scored)
        done = [t for t in trials if t["state"] == "COMPLETE"]
        best = max(done, key=lambda t: t["value"])
        dice = {t["number"]: {c["case_id"]: c["dice"] for c in read_metrics(t["run_dir"])["cases"]} for t in done}

        def reached(t):
            diffs = [dice[best["number"]][c] - dice[t["number"]][c] for c in dice[best["number"]]]
            mean = sum(diffs) / len(diffs)
            sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) if len(diffs) > 1 else 0.0
            return mean <= sd / math.sqrt(len(diffs))

        within = [t for t in done if reached(t)]
        expected = min(within, key=lambda t: (t["trainable_params"], -t["value"], t["number"]))
        assert fold_record["chosen"]["number"] == expected["number"]
        final = read_metrics(root / f"runs/phantom_sah/multiview_unet/auto/fold{fold}")
        assert final["run"]["method"] == "auto" and final["run"]["fold"] == fold
        assert sorted(c["case_id"] for c in final["cases"]) == outer[fold]
        assert fold_record["outer"]["dice"] == final["val"]["dice"]
        assert final["cost"]["trainable_params"] == expected["trainable_params"]  # the chosen configuration trained


def _scored_trial(tmp_path, number, case_dice, params, method="a"):
    """A completed trial whose run folder scored `case_dice` on the inner cases."""
    from segadapt.runs import METRICS_FORMAT, write_metrics
    run_dir = tmp_path / f"trial{number:03d}"
    cases = [{"case_id": f"case{i}", "dice": d} for i, d in enumerate(case_dice)]
    write_metrics(run_dir, {"format": METRICS_FORMAT, "val": {"dice": sum(case_dice) / len(case_dice)}, "cases": cases})
    made = create_trial(value=sum(case_dice) / len(case_dice), params={"method": method},
                        distributions={"method": CategoricalDistribution(["a", "b", "c"])},
                        user_attrs={"trainable_params": params, "run_dir": str(run_dir)})
    made.number = number
    return made


def test_one_standard_error_rule_pairs_the_trials_by_case(tmp_path):
    """Trial 1 is 0.01 below the best on every case: worse, though 0.01 is far within one SE of the best's mean
    (cases 0.70-0.90, SE 0.058). Trial 2 is 0.01 below on average but its per-case differences (-0.02, +0.04,
    +0.01) have SE 0.017: within reach, and the fewest parameters."""
    trials = [_scored_trial(tmp_path, 0, [0.90, 0.70, 0.80], 1000),
              _scored_trial(tmp_path, 1, [0.89, 0.69, 0.79], 100),
              _scored_trial(tmp_path, 2, [0.92, 0.66, 0.79], 500)]
    assert choose(trials, "one_se", 0).number == 2
    assert choose(trials[:2], "one_se", 0).number == 0  # the consistently worse trial is not within reach
    assert choose(trials, "best", 0).number == 0
    far = _scored_trial(tmp_path, 3, [0.70, 0.60, 0.50], 1)  # 0.2 below on every case
    assert choose([trials[0], far], "one_se", 0).number == 0
    failed = create_trial(state=TrialState.FAIL, user_attrs={"error": "rank 9 too large"})
    with pytest.raises(ValueError, match=r"no trial of fold 3 finished \(errors: rank 9 too large\)"):
        choose([failed], "one_se", 3)


def test_paired_difference_against_a_hand_computation():
    from segadapt.training.auto_study import paired_difference
    mean, se = paired_difference({"a": 0.9, "b": 0.7, "c": 0.8, "only": 1.0}, {"a": 0.92, "b": 0.66, "c": 0.79})
    # differences -0.02, 0.04, 0.01: mean 0.01, sd sqrt((0.03^2 + 0.03^2 + 0) / 2) = 0.03, SE 0.03 / sqrt(3)
    assert mean == pytest.approx(0.01) and se == pytest.approx(0.03 / math.sqrt(3))
    assert paired_difference({"a": 0.9}, {"a": 0.5}) == pytest.approx((0.4, 0.0))  # one case: no spread known
    with pytest.raises(ValueError, match="no inner case scored by both"):
        paired_difference({"a": 0.9}, {"b": 0.5})


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
    argv = _argv(tmp_path, "--trials", "3", "--folds", "0", "trainer.max_steps=6", "auto.ensemble=0")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILL_AT_TRIAL_1, *argv], env=env, capture_output=True, text=True,
                            timeout=900)
    assert killed.returncode == -9, killed.stderr[-2000:]
    trials_dir = tmp_path / "runs/phantom_sah/auto/fold0"
    first = trials_dir / "trial000/metrics.json"
    before = _digest(first)
    assert (trials_dir / "trial001/last.ckpt").is_file() and not (trials_dir / "trial001/metrics.json").exists()
    assert optuna.load_study(study_name="fold0", storage=open_storage(trials_dir.parent)) \
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
    ("no worker", ["--trials", "2", "--workers", "0"], r"^error: --workers 0: give 1 or more worker processes$"),
    ("norms not true / false", ["--trials", "2", "auto.norms=[maybe]"], r"auto\.norms must be a non-empty list of true / false"),
    ("norm tuning alone without affine norms", ["--trials", "2", "auto.methods=[norms]"],
     r"auto\.methods=\[norms\]: multiview_unet has no normalisation layer with affine parameters"),
    ("norms beside every adapter without affine norms", ["--trials", "2", "auto.norms=[true]"],
     r"auto\.norms=\[true\]: multiview_unet has no normalisation layer with affine parameters .*give auto\.norms=\[false\]"),
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
    study = root / "runs/phantom_sah/auto/study.journal"
    study.rename(study.with_suffix(".aside"))
    try:
        before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
        with pytest.raises(SystemExit) as exit_:
            auto_main(_argv(root, "--trials", "3", "--folds", "0,1"))
        assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    finally:
        study.with_suffix(".aside").rename(study)
    assert exit_.value.code == 2
    assert re.fullmatch(r"error: .*auto/fold0/trial000: trial folders of a search whose study \(.*study\.journal\) is "
                        r"gone; delete .*auto to start anew", capsys.readouterr().err.strip())


def test_timeout_budget(searched):
    """--timeout alone: trials start until that many seconds of the fold's search have passed, then the choice."""
    root = searched["root"]
    record = auto_main(_argv(root, "--timeout", "8", "--folds", "0", runs="timed"))
    storage = open_storage(root / "timed/phantom_sah/auto")
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
    assert re.fullmatch(r"error: .*study\.journal: fold 0's study was made with other settings \(overrides: .*"
                        r"'trainer\.max_steps=5'\]\); run it with its own, or delete .*auto to start anew", err), err


# ---- ensembles of the top trials (issue 21) -------------------------------------------------------------------
ENSEMBLE = ["--trials", "3", "--folds", "0", "auto.methods=[lora_c,cp_lora]", "auto.ranks=[2,8]", "auto.lr_factor=[3,10]",
            "auto.ensemble=3", "auto.ensemble_rule=always", "auto.pruner=none", "pretrain.max_steps=30",
            "trainer.max_steps=10"]  # members of both families that predict apart


@pytest.fixture(scope="module")
def ensembled(tmp_path_factory) -> dict:
    """A 3-trial search of fold 0 whose ensemble of its 3 trials is forced (``ensemble_rule=always``), with
    every data module the search set up recorded."""
    root = tmp_path_factory.mktemp("ensemble")
    space = yaml.safe_load((CONFIGS / "auto.yaml").read_text())
    space["placements"] = {"all_conv": {"preset": "all_conv"}, "encoder": {"preset": "encoder"}}  # no `train`
    (root / "auto.yaml").write_text(yaml.safe_dump(space))
    loaded, served = [], []
    with pytest.MonkeyPatch.context() as patch:
        _record_loading(patch, loaded, served)
        record = auto_main(_argv(root, *ENSEMBLE, "--space", str(root / "auto.yaml")))
    return {"root": root, "record": record, "loaded": loaded, "served": served,
            "folder": root / "runs/phantom_sah/multiview_unet/auto/fold0"}


def _label(path):
    import nibabel as nib
    import numpy as np
    return np.asarray(nib.load(str(path)).dataobj) > 0


def _mean_probabilities(runs, image):
    """The members' probabilities, each member predicted alone (its own Predictor), averaged here."""
    from segadapt.inference import Predictor
    return sum(Predictor.from_runs([r]).predict(image).probabilities for r in runs) / len(runs)


def _dice(mask, truth) -> float:
    import numpy as np
    total = int(mask.sum() + truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(mask, truth).sum()) / total


def _case_files(dataset: Path) -> dict:
    """case id -> (image, label) paths of a dataset.json."""
    entries = json.loads(dataset.read_text())["training"]
    return {c["case_id"]: tuple(dataset.parent / c[k] for k in ("image", "label")) for c in entries}


def test_ensemble_inner_dice_is_the_mean_of_the_members(ensembled):
    fold = ensembled["record"]["folds"][0]
    comparison, trials = fold["ensemble"], {t["number"]: t for t in fold["trials"]}
    done = sorted((t for t in trials.values() if t["state"] == "COMPLETE"), key=lambda t: (-t["value"], t["number"]))
    assert comparison["members"] == [t["number"] for t in done[:3]]  # the top 3 by inner Dice
    members = [trials[n]["run_dir"] for n in comparison["members"]]
    files = _case_files(ensembled["root"] / "runs/phantom_sah/auto/fold0/data/dataset.json")
    dice = {row["case_id"]: _dice(_mean_probabilities(members, files[row["case_id"]][0])[0] > 0.5,
                                  _label(files[row["case_id"]][1]))
            for row in comparison["inner_cases"]}
    assert sorted(dice) == sorted(fold["cases"]["inner"])
    for row in comparison["inner_cases"]:
        assert row["dice"] == pytest.approx(dice[row["case_id"]], rel=1e-6)
    assert comparison["inner_dice"] == pytest.approx(sum(dice.values()) / len(dice), rel=1e-6)
    for member in members:  # a mean, not a member: each member alone scores otherwise
        alone = {c: _dice(_mean_probabilities([member], files[c][0])[0] > 0.5, _label(files[c][1])) for c in dice}
        assert alone != pytest.approx(dice, rel=1e-3)
    single = trials[fold["chosen"]["number"]]
    assert comparison["single"] == {"trial": single["number"], "inner_dice": single["value"]}
    alone = {c["case_id"]: c["dice"] for c in read_metrics(single["run_dir"])["cases"]}
    diffs = [dice[c] - alone[c] for c in sorted(dice)]
    mean = sum(diffs) / len(diffs)
    assert comparison["difference"] == pytest.approx(mean, abs=1e-6)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) if len(diffs) > 1 else 0.0  # one case: 0
    assert comparison["difference_se"] == pytest.approx(sd / math.sqrt(len(diffs)), abs=1e-6)


def test_ensemble_folder_predict_and_outer_score(ensembled, tmp_path, capsys):
    """The chosen ensemble: its members trained on the outer fold inside its folder; its metrics.json the mean of
    their probabilities on the fold's validation cases; predict --run on the folder averages the members; the
    report counts it as the fold's `auto` run; the export refuses it naming the members."""
    from segadapt.export.cli import main as export_main
    from segadapt.inference import Predictor
    from segadapt.training.report import write_report
    from segadapt.training.report_runs import collect_runs

    root, folder, fold = ensembled["root"], ensembled["folder"], ensembled["record"]["folds"][0]
    numbers = fold["ensemble"]["members"]
    members = [folder / f"trial{n:03d}" for n in numbers]
    assert json.loads((folder / "ensemble.json").read_text())["members"] == [m.name for m in members]
    assert not (folder / "config.yaml").exists()
    trials = {t["number"]: t for t in fold["trials"]}
    for member, number in zip(members, numbers):  # each member configuration as an ordinary run of the outer fold
        config = yaml.safe_load((member / "config.yaml").read_text())
        assert config["run"]["fold"] == 0 and config["datamodule"]["dataset_json"].endswith("phantom_sah/dataset.json")
        assert read_metrics(member)["cost"]["trainable_params"] == trials[number]["trainable_params"]
    metrics = read_metrics(folder)
    outer = _outer_folds(root)[0]
    assert sorted(c["case_id"] for c in metrics["cases"]) == outer and fold["outer"]["dice"] == metrics["val"]["dice"]
    files = _case_files(root / "data/phantom_sah/dataset.json")
    for case in metrics["cases"]:
        image, label = files[case["case_id"]]
        mean = _mean_probabilities(members, image)
        ensemble = Predictor.from_runs([folder]).predict(image)
        assert ensemble.probabilities == pytest.approx(mean, abs=1e-5)
        assert case["dice"] == pytest.approx(_dice(mean[0] > 0.5, _label(label)), rel=1e-6)
    assert metrics["cost"]["trainable_params"] == sum(trials[n]["trainable_params"] for n in numbers)
    found = [r for r in collect_runs(root / "runs/phantom_sah") if r["method_dir"] == "multiview_unet/auto"]
    assert [r["fold_dir"] for r in found] == [str(folder)]  # the ensemble, not its members
    report = write_report(root / "runs/phantom_sah", tmp_path / "report")
    rows = list(csv.DictReader(report["folds_csv"].open()))
    auto_rows = [r for r in rows if r["method"].endswith("auto")]
    assert len(auto_rows) == 1 and float(auto_rows[0]["dice_mean"]) == pytest.approx(metrics["val"]["dice"])
    chosen = report["markdown"].read_text(encoding="utf-8").split("### Chosen configuration per fold")[1].split("###")[0]
    row = next(line for line in chosen.splitlines() if line.startswith("| 0 "))  # the ensemble: its members
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == " + ".join(map(str, numbers))
    assert cells[2] == " + ".join(trials[n]["choice"]["method"] for n in numbers)
    assert cells[-2] == f"{fold['ensemble']['inner_dice']:.3f} ± {fold['ensemble']['inner_se']:.3f}"
    with pytest.raises(SystemExit) as exit_:
        export_main([str(folder), "--merged", str(tmp_path / "merged.safetensors")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"segadapt export: error: .*fold0 is an ensemble of 3 runs \(ensemble\.json\), not one network: "
                        r"give one of its members \(.*trial\d{3}, .*trial\d{3}, .*trial\d{3}\); segadapt predict --run takes the "
                        r"ensemble", err), err
    assert not (tmp_path / "merged.safetensors").exists()


def test_no_ensemble_member_loads_a_validation_case(ensembled):
    """The trials and the inner scoring of the ensemble load the fold's training patients only; the members
    trained on the outer fold validate on its validation cases and train and select on the others."""
    root, loaded, served = ensembled["root"], ensembled["loaded"], ensembled["served"]
    outer = _outer_folds(root)[0]
    inner_data = str((root / "runs/phantom_sah/auto/fold0/data/dataset.json").resolve())
    searched_modules = [e for e in loaded if e["dataset"] == inner_data]
    assert len(searched_modules) == 3 + 1  # the trials, and the ensemble's inner scoring
    for entry in searched_modules:
        assert {c["case_id"] for s in entry["sets"].values() for c in s}.isdisjoint(outer)
    for entry in (s for s in served if s["dataset"] == inner_data):  # what their loaders iterated
        assert entry["cases"] and set(entry["cases"]).isdisjoint(outer), entry
    finals = [e for e in loaded if e["dataset"] == str((root / "data/phantom_sah/dataset.json").resolve())]
    assert len(finals) == 3 + 1  # the members' outer runs, and the ensemble's outer scoring
    for entry in finals:
        sets = {k: [c["case_id"] for c in v] for k, v in entry["sets"].items()}
        assert sorted(sets["val"]) == outer
        assert set(sets["train"]).isdisjoint(outer) and set(sets["inner"]).isdisjoint(outer)
    # the members' training and model selection never iterate the validation cases; each member's and the
    # ensemble's scoring iterate exactly them
    _check_served(served, root / "data/phantom_sah/dataset.json", outer, scored=3 + 1)


def test_ensemble_rule():
    """one_se: the ensemble only when it beats the single choice by more than the SE of their per-case difference."""
    from segadapt.training.auto_ensemble import prefer_ensemble
    assert prefer_ensemble(0.06, 0.05, "one_se")
    assert not prefer_ensemble(0.04, 0.05, "one_se") and not prefer_ensemble(0.05, 0.05, "one_se")
    assert prefer_ensemble(-0.5, 0.05, "always") and not prefer_ensemble(0.5, 0.05, "never")


def test_ensemble_refused_by_the_numbers(searched):
    """A search with ``ensemble_rule=never``: each fold's comparison is recorded with its numbers, the ensemble is
    refused and the single run stays in the fold's folder."""
    for fold in searched["record"]["folds"]:
        comparison = fold["ensemble"]
        if comparison is None:  # fewer than two completed adapter trials that share a base
            continue
        assert comparison["rule"] == "never" and comparison["chosen"] is False
        assert comparison["single"]["trial"] == fold["chosen"]["number"] and len(comparison["members"]) >= 2
        folder = searched["root"] / f"runs/phantom_sah/multiview_unet/auto/fold{fold['fold']}"
        assert not (folder / "ensemble.json").exists() and (folder / "config.yaml").is_file()


# ---- per-layer rank caps and per-stage rank patterns (issue 21) ----------------------------------------------
def _most_rank(method: str, init: str, cout: int, cin: int, kernel: tuple) -> int:
    """The largest rank each family's update of a (cout, cin, *kernel) conv takes, from its factor shapes."""
    k, fan_in = kernel[0], cin * math.prod(kernel)
    shape = (cout, cin, *kernel)
    if method in ("lora_c", "dora_c"):  # B (cout k x r k), A (r k x fan_in / k); PiSSA: SVD of (cout k x fan_in / k)
        most = max(cout * k, fan_in // k)
        return min(most, min(cout * k, fan_in // k) // k) if init == "pissa" else most
    if method in ("cp_lora", "cp_dora"):  # one rank-one term per unfolding column at most
        return math.prod(shape) // min(shape)
    if method == "salt":  # the singular values of M(W)
        return min(cout, fan_in)
    most = max(cout, fan_in)  # conv_lora, conv_dora, tlora: B (cout x r), A (r x fan_in)
    return {"pissa": min(cout, fan_in), "eva": min(most, fan_in)}.get(init, most)


CAPPED = [(m, "default") for m in ("lora_c", "dora_c", "conv_lora", "conv_dora", "cp_lora", "cp_dora", "salt", "tlora")] \
    + [(m, "pissa") for m in ("lora_c", "dora_c", "conv_lora", "conv_dora")] + [("conv_lora", "eva")]


@pytest.mark.parametrize("method, init", CAPPED)
def test_rank_capped_per_layer(method, init):
    import torch
    from segadapt.adapters import AdapterConfig, adapted_layers, capped_ranks, inject

    layers = {"wide": (2, 3, (3, 3, 3)), "narrow": (1, 2, (1, 1, 1)), "mid": (4, 2, (3, 3, 3)), "flat": (8, 2, (1, 1, 1))}
    net = torch.nn.ModuleDict({n: torch.nn.Conv3d(cin, cout, kernel) for n, (cout, cin, kernel) in layers.items()})
    config = dict(method=method, rank=1000, targets=list(layers), lora_rank=1, init=init)
    with pytest.raises(ValueError, match="exceeds"):
        inject(net, AdapterConfig(**config))
    with pytest.warns(UserWarning, match="every adapted layer"):
        inject(net, AdapterConfig(**config, cap_rank=True))
    ranks = {name: layer.adapters["default"].rank for name, layer in adapted_layers(net)}
    assert ranks == {n: _most_rank(method, init, *shape) for n, shape in layers.items()}
    assert capped_ranks(net) == {n: [1000, r] for n, r in ranks.items()}


def test_rank_pattern_reaches_the_layers(tmp_path):
    """A per-stage pattern of the space: the encoder preset's layers get rank x2, the others the rank (each capped
    at what it can take), read back from the adapted network."""
    import copy
    from segadapt.adapters import AdapterConfig, adapted_layers, inject
    from segadapt.models import preset_targets
    from segadapt.training.auto_space import apply_choice

    search = auto.Search(CONFIGS, [*TINY, f"paths.data={tmp_path}/data", f"paths.runs={tmp_path}/runs"], trials=1)
    choice = {"method": "lora_c", "rank": 4, "rank_pattern": "encoder_x2", "placement": "all_conv", "lr_factor": 1.0}
    adapter = apply_choice(search.method_config("lora_c"), choice, search.space, search.module_names)["adapter"]
    net = copy.deepcopy(search._net)
    encoder = set(preset_targets(net, "encoder"))
    inject(net, AdapterConfig.from_dict({**adapter["spec"], "targets": preset_targets(net, adapter["preset"])}))
    ranks = {name: (layer.adapters["default"].rank, type(layer.adapters["default"]).rank_bound(layer.spec, layer.adapters["default"].config))
             for name, layer in adapted_layers(net)}
    assert encoder and set(ranks) > encoder
    for name, (rank, bound) in ranks.items():
        assert rank == min(8 if name in encoder else 4, bound), name


def test_rank_32_search_finishes_every_trial(tmp_path):
    """Rank 32 on the tiny network (4 and 8 channels, a 1-channel head): every trial finishes, the layers too small
    for it are capped and listed in the trial's metrics.json."""
    record = auto_main(_argv(tmp_path, "--trials", "3", "--folds", "0", "auto.ranks=[32]", "auto.methods=[lora_c,salt,cp_lora]",
                             "auto.ensemble=0", "auto.pruner=none"))
    trials = record["folds"][0]["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3 and not any(t["error"] for t in trials)
    capped = [read_metrics(t["run_dir"])["capped_ranks"] for t in trials]
    assert any(capped)  # SALT's min(Cout, Cin k^d) on the 4-channel layers is below 32
    assert all(asked in (32, 64) and asked > used for c in capped for asked, used in c.values())  # 64: a x2 rank pattern
