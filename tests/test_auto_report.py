"""The report section of a ``segadapt auto`` search: on a tiny real search beside ``none`` and ``full`` runs (the
``auto`` row's p-values against scipy on the per-case Dice read back from the run folders, the chosen
configuration against the record and the run folders, trials per hour and the training-step share against the
trials' metrics.json, a search killed before its last fold finished), and on a hand-written auto.json and Optuna
study with known values (fANOVA importance against Optuna's evaluator called directly, the best-so-far trace)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.importance import FanovaImportanceEvaluator, get_param_importances
from optuna.trial import TrialState, create_trial
from scipy import stats

from segadapt.cli import main as segadapt_main
from segadapt.training import auto
from segadapt.training import report_auto
from segadapt.training.auto_study import fold_entry, trial_record
from segadapt.training.auto_workers import open_storage
from segadapt.training.jobs import train
from segadapt.training.report import write_report
from segadapt.training.report_plots import auto_trace_figure
from test_auto import CONFIGS, TINY, _argv  # noqa: E402 (tests/ is on sys.path: the tiny search of test_auto)
from test_training_report import DICE, _config, _write  # noqa: E402 (hand-written fold folders)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore::optuna.exceptions.ExperimentalWarning")


def _csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _case_dice(folder: Path) -> dict[str, float]:
    """Per-case Dice of every fold<k>/metrics.json under a method folder."""
    return {c["case_id"]: c["dice"] for m in sorted(folder.glob("fold*/metrics.json"))
            for c in json.loads(m.read_text(encoding="utf-8"))["cases"]}


def _section(text: str, title: str) -> str:
    return text.split(f"### {title}")[1].split("\n### ")[0]


# ---- a tiny real search beside fixed methods ---------------------------------------------------------------
@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """A 3-trial search of outer folds 0 and 1 (as tests/test_auto.py runs it) and `none` / `full` on the same
    folds: runs/phantom_sah, reported once. Single choices (`auto.ensemble=0`): an ensemble's report row is
    tests/test_auto.py's."""
    root = tmp_path_factory.mktemp("autoreport")
    auto.main(_argv(root, "--trials", "3", "--folds", "0,1", "auto.ensemble=0"))
    for method in ("none", "full"):
        for fold in (0, 1):
            train(auto.compose(CONFIGS, [*TINY, f"paths.data={root}/data", f"paths.runs={root}/runs",
                                              f"adapter={method}", f"fold={fold}"]))
    return root / "runs/phantom_sah"


@pytest.fixture(scope="module")
def reported(experiment) -> dict:
    study = experiment / "auto/study.journal"
    before = hashlib.sha256(study.read_bytes()).hexdigest()
    paths = write_report(experiment)
    return {"paths": paths, "study_unchanged": hashlib.sha256(study.read_bytes()).hexdigest() == before,
            "text": paths["markdown"].read_text(encoding="utf-8"),
            "record": json.loads((experiment / "auto.json").read_text(encoding="utf-8"))}


def test_auto_row_matches_wilcoxon_on_the_run_folders(experiment, reported):
    rows = {r["method"]: r for r in _csv(reported["paths"]["csv"])}
    model = experiment / "multiview_unet"
    dice = {m: _case_dice(model / m) for m in ("auto", "full", "none")}
    assert set(dice["auto"]) == set(dice["full"]) == set(dice["none"]) and len(dice["auto"]) == 4
    cases = sorted(dice["auto"])
    row = rows["auto"]
    assert row["tuning"] == "auto" and int(row["n_cases"]) == 4 and int(row["folds"]) == 2
    assert float(row["dice_mean"]) == pytest.approx(np.mean([dice["auto"][c] for c in cases]), abs=1e-12)
    for reference in ("full", "none"):
        with np.errstate(all="ignore"):
            expected = stats.wilcoxon([dice["auto"][c] for c in cases], [dice[reference][c] for c in cases]).pvalue
        assert float(row[f"p_vs_{reference}"]) == pytest.approx(expected, abs=1e-12)
    # the folds chose their own adaptation (config.yaml differs in the learning rate at least), which is no flag
    configs = [yaml.safe_load((model / f"auto/fold{k}/config.yaml").read_text(encoding="utf-8"))["module"] for k in (0, 1)]
    assert configs[0]["lr"] != configs[1]["lr"]
    assert row["settings_differ"] == "" and re.search(r"^\| auto +\|", reported["text"], re.M)
    assert list(rows)[-1] == "auto"  # after every fixed method


def test_auto_against_each_fixed_method_paired_by_case(experiment, reported):
    """The section's table against the per-case Dice of the run folders: means, mean difference, scipy's Wilcoxon
    p and Holm's adjustment over the two comparisons written out by hand."""
    model = experiment / "multiview_unet"
    dice = {m: _case_dice(model / m) for m in ("auto", "full", "none")}
    cases = sorted(dice["auto"])
    rows = {}
    for line in _section(reported["text"], "`auto` against each fixed method").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] in ("full", "none"):
            rows[cells[0]] = cells
    assert set(rows) == {"full", "none"}
    with np.errstate(all="ignore"):
        p = {m: stats.wilcoxon([dice["auto"][c] for c in cases], [dice[m][c] for c in cases]).pvalue for m in rows}
    low, high = sorted(rows, key=lambda m: p[m])
    holm = {low: min(1.0, 2 * p[low])}
    holm[high] = max(holm[low], min(1.0, p[high]))
    for method, cells in rows.items():
        mean_it = np.mean([dice[method][c] for c in cases])
        mean_auto = np.mean([dice["auto"][c] for c in cases])
        assert int(cells[1]) == len(cases) == 4
        assert all(re.fullmatch(r"\d\.\d{3}", cell) for cell in cells[2:4]), cells  # Dice to 3 decimals, as elsewhere
        assert float(cells[2]) == pytest.approx(mean_it, abs=6e-4) and float(cells[3]) == pytest.approx(mean_auto, abs=6e-4)
        assert float(cells[4]) == pytest.approx(np.mean([dice["auto"][c] - dice[method][c] for c in cases]), abs=6e-4)
        assert float(cells[5]) == pytest.approx(p[method], rel=0.06)
        assert float(cells[6]) == pytest.approx(holm[method], rel=0.06)


def test_chosen_configuration_per_fold(experiment, reported):
    table = _section(reported["text"], "Chosen configuration per fold")
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
    head, body = lines[0], lines[2:]
    assert len(body) == 2
    for cells, entry in zip(body, reported["record"]["folds"]):
        cell = dict(zip(head, cells))
        fold = entry["fold"]
        trial = next(t for t in entry["trials"] if t["number"] == entry["chosen"]["number"])
        final = json.loads((experiment / f"multiview_unet/auto/fold{fold}/metrics.json").read_text(encoding="utf-8"))
        assert cell["fold"] == str(fold) and cell["trial"] == str(trial["number"])
        assert cell["method"] == trial["choice"]["method"]
        assert cell["rank"] == str(trial["choice"].get("rank", "-"))
        assert cell["trainable params"] == f"{final['cost']['trainable_params']:,}"
        assert cell["inner Dice ± SE"] == f"{trial['value']:.3f} ± {trial['se']:.3f}"
        assert cell["outer Dice (n)"] == f"{final['val']['dice']:.3f} ({len(final['cases'])})"
    assert "Incomplete" not in reported["text"]


def test_trace_csv_trials_per_hour_and_training_step_share(experiment, reported):
    rows = _csv(reported["paths"]["auto_trials_csv"])
    record = reported["record"]
    assert [(int(r["fold"]), int(r["number"])) for r in rows] == \
        [(e["fold"], t["number"]) for e in record["folds"] for t in e["trials"]]
    for fold_record in record["folds"]:
        fold = fold_record["fold"]
        mine = [r for r in rows if int(r["fold"]) == fold]
        best = -math.inf
        for r, t in zip(mine, fold_record["trials"]):
            assert r["state"] == t["state"] and float(r["inner_dice"]) == pytest.approx(t["inner_dice"])
            assert int(r["trainable_params"]) == t["trainable_params"] and r["param_method"] == t["params"]["method"]
            best = max(best, t["value"]) if t["state"] == "COMPLETE" else best
            assert float(r["best_so_far"]) == pytest.approx(best)
            assert int(r["chosen"]) == (t["number"] == fold_record["chosen"]["number"])
        finished = [t for t in fold_record["trials"] if t["state"] in ("COMPLETE", "PRUNED")]
        seconds = sum(t["time_s"] for t in finished)
        steps = sum(json.loads((Path(t["run_dir"]) / "metrics.json").read_text(encoding="utf-8"))["timing"]["train_steps_s"]
                    for t in finished)
        line = next(line for line in reported["text"].splitlines() if line.startswith(f"- fold {fold}:"))
        assert f"{len(finished)} finished trials in {seconds:.0f} s of trial time" in line
        assert f"**{3600 * len(finished) / seconds:.0f} trials per hour**" in line
        assert f"training steps {100 * steps / seconds:.0f}% of it" in line
    for suffix in ("png", "svg", "pdf"):
        assert (experiment / f"auto_trace.{suffix}").stat().st_size > 1000
    assert reported["study_unchanged"]  # the report reads the study, never writes it
    # 2-3 completed trials per fold: one line each, no numbers
    importance = _section(reported["text"], "Importance of each option")
    assert re.search(r"- fold 0: \d completed trials, too few for fANOVA", importance)
    assert _csv(reported["paths"]["auto_importance_csv"]) == []


def test_a_search_killed_before_its_last_fold_finished(experiment, tmp_path):
    """Fold 1's final run killed (config.yaml, no metrics.json; auto.json without its outer Dice): the report
    holds fold 0 only and names fold 1; a fold whose run folder no longer holds the recorded Dice is left out."""
    killed = tmp_path / "killed"
    shutil.copytree(experiment, killed)
    record = json.loads((killed / "auto.json").read_text(encoding="utf-8"))
    record["folds"][1]["outer"] = None
    (killed / "auto.json").write_text(json.dumps(record))
    (killed / "multiview_unet/auto/fold1/metrics.json").unlink()
    paths = write_report(killed)
    text = paths["markdown"].read_text(encoding="utf-8")
    row = {r["method"]: r for r in _csv(paths["csv"])}["auto"]
    fold0 = _case_dice(experiment / "multiview_unet/auto") | {}
    fold0 = {c: d for c, d in fold0.items() if c in record["folds"][0]["outer"]["cases"]}
    assert int(row["n_cases"]) == 2 and float(row["dice_mean"]) == pytest.approx(np.mean(list(fold0.values())))
    assert re.search(r"\*\*Incomplete\*\* .*fold 1 \(the chosen configuration's run has not finished\)", text)
    chosen = _section(text, "Chosen configuration per fold")
    assert re.search(r"^\| 0 ", chosen, re.M) and not re.search(r"^\| 1 ", chosen, re.M)

    stale = tmp_path / "stale"
    shutil.copytree(experiment, stale)
    record = json.loads((stale / "auto.json").read_text(encoding="utf-8"))
    record["folds"][0]["outer"]["dice"] += 0.1
    (stale / "auto.json").write_text(json.dumps(record))
    text = write_report(stale)["markdown"].read_text(encoding="utf-8")
    assert re.search(r"fold 0 \(.*multiview_unet/auto/fold0 does not hold the outer Dice auto\.json records", text)
    assert int({r["method"]: r for r in _csv(stale / "report.csv")}["auto"]["n_cases"]) == 2  # fold 1's only


def test_folds_missing_from_auto_json_come_from_the_study(experiment, tmp_path):
    """auto.json without fold 0 (a search killed before it rewrote its record): fold 0 is read from study.journal,
    as auto.json listed it, and reported beside fold 1."""
    later = tmp_path / "later"
    shutil.copytree(experiment, later)
    record = json.loads((later / "auto.json").read_text(encoding="utf-8"))
    fold0 = record["folds"][0]
    (later / "auto.json").write_text(json.dumps({**record, "folds": record["folds"][1:]}))
    merged = report_auto.read_record(later)
    assert [e["fold"] for e in merged["folds"]] == [0, 1]
    assert json.loads(json.dumps(merged["folds"][0])) == {**fold0, "from_storage": True}
    paths = write_report(later)
    text = paths["markdown"].read_text(encoding="utf-8")
    assert int({r["method"]: r for r in _csv(paths["csv"])}["auto"]["n_cases"]) == 4 and "Incomplete" not in text
    assert "Fold 0: read from study.journal" in text
    assert re.search(r"^\| 0 ", _section(text, "Chosen configuration per fold"), re.M)


def test_a_corrupt_auto_json_is_one_line(experiment, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(experiment, broken, ignore=shutil.ignore_patterns("report*", "auto_*", "dice_*"))
    (broken / "auto.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_:
        segadapt_main(["report", str(broken)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: .*broken/auto\.json is not readable JSON \(.*\); run segadapt auto again to "
                        r"rewrite it", err), err
    assert not (broken / "report.md").exists()
    (broken / "auto.json").write_text(json.dumps({"format": "segadapt-metrics/1", "folds": []}))
    with pytest.raises(SystemExit):
        segadapt_main(["report", str(broken)])
    assert re.fullmatch(r"error: .*broken/auto\.json is not a segadapt auto record \(format segadapt-auto/1\)",
                        capsys.readouterr().err.strip())
    assert not (broken / "report.md").exists()


# ---- a hand-written study with known values ----------------------------------------------------------------
METHODS, RANKS, PLACEMENTS = ["lora_c", "cp_lora", "full"], [2, 4, 8], ["encoder", "encoder+decoder"]
DISTRIBUTIONS = {"method": CategoricalDistribution(METHODS), "rank": CategoricalDistribution(RANKS),
                 "placement": CategoricalDistribution(PLACEMENTS), "lr_factor": FloatDistribution(0.3, 3.0, log=True)}
SPACE = {"rule": "best", "placements": {"encoder": {"preset": "encoder"},
                                        "encoder+decoder": {"preset": "encoder", "train": "decoder"}}}


def _hand_study(storage: str, fold: int, n: int) -> optuna.Study:
    """`n` trials: the inner Dice a known function of the options (the method matters most, then the rank);
    trial 3 pruned, trial 5 failed."""
    rng = np.random.default_rng(fold)
    study = optuna.create_study(storage=storage, study_name=f"fold{fold}", direction="maximize")
    study.set_user_attr("settings", {"overrides": [], "space": SPACE})
    for number in range(n):
        params = {"method": METHODS[number % 3], "lr_factor": float(rng.uniform(0.3, 3.0))}
        if params["method"] != "full":
            params |= {"rank": RANKS[(number // 3) % 3], "placement": PLACEMENTS[number % 2]}
        value = 0.5 + 0.2 * (params["method"] == "cp_lora") + 0.01 * params.get("rank", 0) + 0.05 * fold \
            + 0.001 * rng.standard_normal()
        attrs = {"choice": params, "inner_dice": value, "se": 0.01, "time_s": 10.0 + number,
                 "trainable_params": 1000 if params["method"] == "full" else 10 * params["rank"],
                 "adapter": {"lr": 1e-3 * params["lr_factor"]}}
        state = {3: TrialState.PRUNED, 5: TrialState.FAIL}.get(number, TrialState.COMPLETE)
        if state == TrialState.FAIL:
            attrs = {"choice": params, "error": "rank 8 too large for a layer", "time_s": 1.0}
        study.add_trial(create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                                     params=params, distributions={k: DISTRIBUTIONS[k] for k in params},
                                     user_attrs=attrs, intermediate_values={2: value - 0.1, 4: value}))
    return study


@pytest.fixture
def hand_written(tmp_path) -> dict:
    """An experiment folder with none / full / auto folds (hand-written metrics.json, test_training_report's) and
    an auto.json + study.journal whose chosen trials score those auto folds."""
    root = tmp_path / "x"
    model = root / "unet"
    for method in ("none", "full"):
        _write(model, method, method, DICE[method])
    _write(model, "auto", "lora_c", DICE["lora_c"])
    (root / "auto").mkdir()
    storage = open_storage(root / "auto")
    studies = {fold: _hand_study(storage, fold, 16) for fold in (0, 1)}
    folds = []
    for fold, study in studies.items():
        trials = [trial_record(t) for t in study.get_trials()]
        best = max((t for t in trials if t["state"] == "COMPLETE"), key=lambda t: t["value"])
        metrics = json.loads((model / f"auto/fold{fold}/metrics.json").read_text(encoding="utf-8"))
        folds.append({"fold": fold, "study": study.study_name, "cases": None, "trials": trials,
                      "chosen": {k: best[k] for k in ("number", "choice", "value", "se")},
                      "outer": {"trial": best["number"], "run_dir": f"/elsewhere/x/unet/auto/fold{fold}",
                                "dice": metrics["val"]["dice"], "n_cases": 3,
                                "cases": [c["case_id"] for c in metrics["cases"]]}})
    (root / "auto.json").write_text(json.dumps({"format": "segadapt-auto/1", "experiment": "x",
                                                "command": ["segadapt", "auto"],
                                                "settings": {"overrides": [], "space": SPACE}, "folds": folds}))
    return {"root": root, "studies": studies, "storage": storage}


def test_importance_against_optunas_evaluator(hand_written):
    paths = write_report(hand_written["root"])
    rows = _csv(paths["auto_importance_csv"])
    got = {(r["scope"], r["subset"], r["param"]): float(r["importance"]) for r in rows}
    adapters = "trials with placement, rank"
    for fold in (0, 1):
        study = optuna.load_study(study_name=f"fold{fold}", storage=hand_written["storage"])
        for subset, params in (("all completed trials", ["lr_factor", "method"]),
                               (adapters, ["lr_factor", "method", "placement", "rank"])):
            expected = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), params=params)
            for param, value in expected.items():
                assert got[(f"fold {fold}", subset, param)] == pytest.approx(value, abs=1e-12)
        # the method decides most of the inner Dice
        assert got[(f"fold {fold}", "all completed trials", "method")] > 0.5
    # pooled: each fold's completed trials, less their fold's mean, in one study
    pooled = optuna.create_study(direction="maximize")
    for study in hand_written["studies"].values():
        done = study.get_trials(states=(TrialState.COMPLETE,))
        mean = np.mean([t.value for t in done])
        pooled.add_trials([create_trial(params=t.params, distributions=t.distributions, value=t.value - mean)
                           for t in done])
    expected = get_param_importances(pooled, evaluator=FanovaImportanceEvaluator(seed=0),
                                     params=["lr_factor", "method"])
    for param, value in expected.items():
        assert got[("pooled", "all completed trials", param)] == pytest.approx(value, abs=1e-12)
    n = {(r["scope"], r["subset"]): int(r["n_trials"]) for r in rows}
    assert n[("fold 0", "all completed trials")] == 14 and n[("pooled", "all completed trials")] == 28
    assert n[("fold 0", adapters)] == 10  # trials 0-15 but 2, 5, 8, 11, 14 (full) and 3 (pruned)
    text = paths["markdown"].read_text(encoding="utf-8")
    importance = _section(text, "Importance of each option")
    table = importance.split("All completed trials:")[1].split("Trials with")[0]
    assert re.search(r"^\| param +\| +fold 0 \(n=14\) \| +fold 1 \(n=14\) \| +pooled \(n=28\) \|$", table, re.M)
    shown = got[("fold 0", "all completed trials", "method")]
    assert re.search(rf"^\| method +\| +{shown:.2f} +\|", table, re.M)


def test_trace_and_chosen_on_the_hand_written_study(hand_written):
    paths = write_report(hand_written["root"])
    rows = _csv(paths["auto_trials_csv"])
    for fold in (0, 1):
        mine = [r for r in rows if r["fold"] == str(fold)]
        trials = hand_written["studies"][fold].get_trials()
        values = [t.value if t.state == TrialState.COMPLETE else -math.inf for t in trials]
        assert [float(r["best_so_far"]) for r in mine] == pytest.approx(list(np.maximum.accumulate(values)))
        assert [r["state"] for r in mine][3] == "PRUNED" and mine[3]["pruned_at_step"] == "4"
        assert mine[5]["state"] == "FAIL" and mine[5]["inner_dice"] == "" and mine[5]["error"].startswith("rank 8")
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        per_hour = 3600 * len(finished) / sum(t.user_attrs["time_s"] for t in finished)
        assert f"- fold {fold}: {len(finished)} finished trials" in paths["markdown"].read_text(encoding="utf-8")
        assert f"**{per_hour:.0f} trials per hour**; training steps - of it" in paths["markdown"].read_text(encoding="utf-8")
        # the plot's panel of the fold: its best-so-far line, its chosen star
        panel = auto_trace_figure(pd.read_csv(paths["auto_trials_csv"])).axes[fold]
        lines = {line.get_label(): line for line in panel.get_lines()}
        running = np.maximum.accumulate(values)
        assert list(lines["best so far"].get_xdata()) == list(range(16))
        assert list(lines["best so far"].get_ydata()) == pytest.approx(list(running))
        assert list(lines["chosen"].get_xdata()) == [int(np.argmax(values))]
        assert list(lines["pruned"].get_xdata()) == [3] and list(lines["failed / interrupted"].get_xdata()) == [5]
    chosen = _section(paths["markdown"].read_text(encoding="utf-8"), "Chosen configuration per fold")
    best0 = max((t for t in hand_written["studies"][0].get_trials() if t.state == TrialState.COMPLETE),
                key=lambda t: t.value)
    assert re.search(rf"^\| 0 +\| {best0.number} +\| cp_lora +\| {best0.params['rank']} +\| "
                     rf"{re.escape(best0.params['placement'])} ", chosen, re.M)


def test_auto_folds_that_differ_in_more_than_the_adaptation_are_flagged(tmp_path):
    """The folds of `auto` may differ in what the search chose (module.lr, module.adapter, ...), not in the rest."""
    for steps, flagged in ((1500, False), (900, True)):
        root = tmp_path / f"x{steps}"
        configs = [_config(0), _config(1, max_steps=steps)]
        for k, config in enumerate(configs):
            config["run"]["method"] = "auto"
            config["module"] = {"model": "unet3d", "adapter": {"method": ["lora_c", "cp_lora"][k], "rank": 2 + k},
                                "lr": 0.001 * (k + 1), "preset": ["encoder", None][k], "reg_weight": [0.0, 1e-3][k]}
        _write(root / "unet", "none", "none", DICE["none"])
        _write(root / "unet", "auto", "lora_c", DICE["lora_c"], configs=configs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            write_report(root)
        assert any("pools folds trained with different settings" in str(w.message) for w in caught) == flagged
        row = {r["method"]: r for r in _csv(root / "report.csv")}["auto"]
        assert (row["settings_differ"] == "fold 1: trainer.max_steps: 1500 -> 900") == flagged
        assert (row["settings_differ"] == "") != flagged


def test_a_search_without_any_finished_run_is_reported_as_far_as_it_got(hand_written):
    """No run folder holds a result yet (only the search's trials): report.md is the search's section alone."""
    root = hand_written["root"]
    shutil.rmtree(root / "unet")
    paths = write_report(root)
    text = paths["markdown"].read_text(encoding="utf-8")
    assert text.startswith("# Search report: x\n") and "## Automatic adaptation" in text
    assert re.search(r"\*\*Incomplete\*\* .*fold 0 \(its run folder <model>/auto/fold0 is missing or unfinished\); "
                     r"fold 1 \(", text)
    assert "No fold has finished." in _section(text, "Chosen configuration per fold")
    assert len(_csv(paths["auto_trials_csv"])) == 32 and not (root / "report.csv").exists()


def test_auto_that_chose_full_is_no_reference_for_full(tmp_path):
    """Without `full` runs, an `auto` whose folds chose full fine-tuning is not the reference of `p vs full`."""
    root = tmp_path / "x"
    for method, tuning in (("none", "none"), ("lora_c", "lora_c"), ("auto", "full")):
        _write(root / "unet", method, tuning, DICE[{"auto": "full"}.get(method, method)])
    write_report(root)
    rows = {r["method"]: r for r in _csv(root / "report.csv")}
    assert rows["auto"]["tuning"] == "auto" and list(rows) == ["none", "lora_c", "auto"]
    assert rows["lora_c"]["p_vs_full"] == "" and rows["auto"]["p_vs_full"] == ""
    with np.errstate(all="ignore"):
        expected = stats.wilcoxon(DICE["full"], DICE["none"]).pvalue
    assert float(rows["auto"]["p_vs_none"]) == pytest.approx(expected, abs=1e-12)


def test_auto_json_keeps_the_folds_of_earlier_commands(tmp_path):
    """`--folds 0` then `--folds 1`: auto.json lists both folds, each as its study holds it."""
    for fold in ("0", "1"):
        auto.main(_argv(tmp_path, "--trials", "1", "--folds", fold, "auto.ensemble=0"))
    record = json.loads((tmp_path / "runs/phantom_sah/auto.json").read_text(encoding="utf-8"))
    assert [f["fold"] for f in record["folds"]] == [0, 1]
    storage = open_storage(tmp_path / "runs/phantom_sah/auto")
    for entry in record["folds"]:
        study = optuna.load_study(study_name=f"fold{entry['fold']}", storage=storage)
        assert entry == json.loads(json.dumps(fold_entry(study)))
        assert entry["outer"] is not None and len(entry["trials"]) == 1
