"""The cross-validation report on hand-written metrics.json files: the statistics against scipy and against
values worked out by hand, the CSV read back, the unadapted base row, the below-base flag, nested layouts."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import stats

import yaml

from segadapt.training.report import write_report
from segadapt.training.report_plots import _colours, _dice_limits, plot_dice_vs_volume
from segadapt.training.report_runs import collect_runs
from segadapt.training.report_stats import bootstrap_ci, holm, method_rows, nan_mean_sd, paired_p
from segadapt.training.report_tables import report_table

CASES = [f"c{i}" for i in range(6)]  # fold 0 validates c0-c2, fold 1 c3-c5
DICE = {
    "none": [0.10, 0.20, 0.05, 0.30, 0.15, 0.25],
    "full": [0.50, 0.62, 0.41, 0.70, 0.58, 0.66],
    "lora_c": [0.55, 0.60, 0.52, 0.74, 0.61, 0.72],
}
COLUMNS = ["method", "n_cases", "dice_mean", "dice_sd", "dice_ci_low", "dice_ci_high", "p_vs_none", "p_vs_full",
           "p_vs_none_holm", "p_vs_full_holm", "trainable_params", "train_time_s"]
MAIN_TABLE = ["method", "n", "Dice", "95% CI", "p vs full", "p vs none", "trainable params", "time (s)"]


def _case(case_id, dice):
    return {"case_id": case_id, "dice": dice, "hd95": 3.0, "pred_ml": 2.0, "true_ml": 1.0 + int(case_id[1:])}


def _write(folder, method, tuning, dice, base=None, below_base=(False, False), last_dice=None, configs=None,
           labels=None):
    """Two fold folders of `method` with a metrics.json; with `configs` (one dict per fold) a config.yaml, with
    `labels` a fingerprint.json naming the dataset's labels."""
    for fold in (0, 1):
        ids = CASES[3 * fold:3 * fold + 3]
        cases = [_case(c, d) for c, d in zip(ids, dice[3 * fold:3 * fold + 3])]
        base_cases = None if base is None else [_case(c, d) for c, d in zip(ids, base[3 * fold:3 * fold + 3])]
        last = cases if last_dice is None else [_case(c, d) for c, d in zip(ids, last_dice[3 * fold:3 * fold + 3])]
        metrics = {
            "format": "segadapt-metrics/1",
            "run": {"experiment": "x", "method": method, "tuning": tuning, "fold": fold},
            "val": {"dice": float(np.mean(dice[3 * fold:3 * fold + 3]))},
            "base_val": None if base is None else {"dice": float(np.mean(base[3 * fold:3 * fold + 3]))},
            "volume_bins_ml": [0, 3, None],
            "cost": {"trainable_params": {"none": 0, "full": 1000, "lora_c": 100}.get(tuning, 100),
                     "train_time_s": 10.0 + fold, "train_steps": 4, "peak_mem_mb": 50.0, "memory": "cpu_rss"},
            "selection": None if tuning == "none" else {"below_base": below_base[fold], "selected_step": 2},
            "cases": cases,
            "last_cases": last,
            "base_cases": base_cases,
        }
        run = folder / method / f"fold{fold}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
        if configs is not None:
            (run / "config.yaml").write_text(yaml.safe_dump(configs[fold]), encoding="utf-8")
        if labels is not None:
            (run / "fingerprint.json").write_text(json.dumps({"labels": labels}), encoding="utf-8")


def _config(fold, max_steps=1500, run_dir="x"):
    """A run's config.yaml as fit_run writes it (the keys that matter here)."""
    return {"format": "segadapt-run/1",
            "run": {"experiment": "x", "method": "lora_c", "fold": fold, "seed": fold, "run_dir": f"{run_dir}/fold{fold}"},
            "module": {"model": "unet3d", "adapter": {"method": "lora_c", "rank": 4}},
            "datamodule": {"dataset_json": "/nowhere/dataset.json", "fold": fold, "n_folds": 2, "num_workers": fold},
            "trainer": {"max_steps": max_steps, "enable_progress_bar": fold == 0}}


def _rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, {r["method"]: r for r in reader}


def _markdown_rows(text):
    """report.md's first table as {method: {column: cell}} (cells stripped of tabulate's padding)."""
    lines = [line for line in text.split("## ")[0].splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    head = split[0]
    return {cells[0]: dict(zip(head, cells)) for cells in split[2:]}


def test_mean_and_sd_skipping_missing_values_by_hand():
    values = [0.2, None, 0.5, math.nan, 0.8]
    mean, sd = nan_mean_sd(values)
    assert mean == pytest.approx(0.5)
    assert sd == pytest.approx(math.sqrt(((0.2 - 0.5) ** 2 + 0 + (0.8 - 0.5) ** 2) / (3 - 1)))  # sample sd, n - 1
    assert math.isnan(nan_mean_sd([0.4, None])[1]) and nan_mean_sd([0.4, None])[0] == 0.4
    assert all(math.isnan(v) for v in nan_mean_sd([None, math.nan]))


def test_bootstrap_interval_and_wilcoxon_against_scipy_and_by_hand():
    values = np.array([0.55, 0.60, 0.52, 0.74, 0.61, 0.72, 0.33, 0.91])
    expected = stats.bootstrap((values,), np.mean, n_resamples=10_000, method="percentile",
                               random_state=np.random.default_rng(0)).confidence_interval
    assert bootstrap_ci(values) == pytest.approx((expected.low, expected.high), abs=1e-12)
    rng = np.random.default_rng(1)  # the percentile bootstrap written out: quantiles of resampled means
    means = values[rng.integers(0, values.size, size=(20_000, values.size))].mean(axis=1)
    assert bootstrap_ci(values) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), abs=0.01)
    assert bootstrap_ci([0.4]) == (pytest.approx(math.nan, nan_ok=True),) * 2
    # six paired cases, every difference positive: the exact two-sided signed-rank p is 2 / 2^6
    a = {f"c{i}": 0.5 + 0.01 * i for i in range(6)}
    b = {f"c{i}": 0.5 - 0.02 * i - 0.001 for i in range(6)}
    assert paired_p(a, b) == pytest.approx(2 / 2**6)
    x, y = [0.55, 0.60, 0.52, 0.74, 0.61, 0.72], [0.50, 0.62, 0.41, 0.70, 0.58, 0.66]
    assert paired_p(dict(zip(CASES, x)), dict(zip(CASES, y))) == pytest.approx(stats.wilcoxon(x, y).pvalue)
    # paired by case id: the order of the cases does not matter, unshared cases are left out
    shuffled = dict(reversed(list(zip(CASES, y))))
    assert paired_p({**dict(zip(CASES, x)), "extra": 0.9}, shuffled) == pytest.approx(stats.wilcoxon(x, y).pvalue)
    assert math.isnan(paired_p({"c0": 0.5}, {"c9": 0.5}))


def test_report_table_statistics_columns_and_flag(tmp_path):
    _write(tmp_path, "none", "none", DICE["none"])
    _write(tmp_path, "full", "full", DICE["full"], base=DICE["none"])
    _write(tmp_path, "lora_c", "lora_c", DICE["lora_c"], base=DICE["none"], below_base=(False, True),
           last_dice=[0.5] * 6)
    paths = write_report(tmp_path, tmp_path / "out")
    fields, rows = _rows(paths["csv"])
    assert fields[:len(COLUMNS)] == COLUMNS and "hd95_mean_mm" in fields and "dice_bin[0-3 mL]" in fields
    assert list(rows) == ["none", "full", "lora_c"]
    for method, dice in DICE.items():
        row = rows[method]
        assert int(row["n_cases"]) == 6
        assert float(row["dice_mean"]) == pytest.approx(np.mean(dice))
        assert float(row["dice_sd"]) == pytest.approx(np.std(dice, ddof=1))
        ci = stats.bootstrap((np.array(dice),), np.mean, n_resamples=10_000, method="percentile",
                             random_state=np.random.default_rng(0)).confidence_interval
        assert (float(row["dice_ci_low"]), float(row["dice_ci_high"])) == pytest.approx((ci.low, ci.high))
    assert rows["none"]["p_vs_none"] == "" and rows["full"]["p_vs_full"] == ""  # a reference against itself: blank
    assert float(rows["lora_c"]["p_vs_none"]) == pytest.approx(2 / 2**6)  # better on every case
    assert float(rows["lora_c"]["p_vs_full"]) == pytest.approx(stats.wilcoxon(DICE["lora_c"], DICE["full"]).pvalue)
    assert float(rows["none"]["p_vs_full"]) == pytest.approx(stats.wilcoxon(DICE["none"], DICE["full"]).pvalue)
    assert float(rows["lora_c"]["trainable_params"]) == 100 and float(rows["lora_c"]["train_time_s"]) == 10.5
    assert float(rows["lora_c"]["dice_last_mean"]) == pytest.approx(0.5)
    assert rows["lora_c"]["below_base_folds"] == "1" and rows["full"]["below_base_folds"] == "0"
    # Holm over the two tests against none (both p = 2/64): 2 x 2/64 for the smaller, then the running maximum
    assert float(rows["lora_c"]["p_vs_none_holm"]) == float(rows["full"]["p_vs_none_holm"]) == pytest.approx(4 / 64)
    text = paths["markdown"].read_text(encoding="utf-8")
    table = _markdown_rows(text)
    assert list(table) == ["none", "full", "lora_c¹"]  # report.md and report.csv: the same rows, the same numbers
    for (method, row), cells in zip(rows.items(), table.values()):
        assert list(cells) == MAIN_TABLE and cells["n"] == row["n_cases"]
        assert cells["Dice"] == f"{float(row['dice_mean']):.3f} ± {float(row['dice_sd']):.3f}"
        assert cells["95% CI"] == f"{float(row['dice_ci_low']):.3f}–{float(row['dice_ci_high']):.3f}"
        for reference in ("none", "full"):
            p = row[f"p_vs_{reference}_holm"]
            assert cells[f"p vs {reference}"] == ("-" if p == "" else f"{float(p):.3f}")
        assert cells["trainable params"] == f"{int(row['trainable_params']):,}"
    assert table["lora_c¹"]["p vs none"] == "0.062" and table["lora_c¹"]["time (s)"] == "10.5 ± 0.7"
    assert "Holm–Bonferroni adjusted within each family (2 tests against `full`, 2 against `none`)" in text
    folds = _markdown_rows(text.split("## Per fold")[1].lstrip())  # a column per fold, ⚠ on the fold below the base
    assert folds["lora_c"] == {"method": "lora_c", "fold 0": f"{np.mean(DICE['lora_c'][:3]):.3f} (n=3)",
                               "fold 1": f"{np.mean(DICE['lora_c'][3:]):.3f} (n=3) ⚠"}
    with open(paths["folds_csv"], encoding="utf-8", newline="") as f:
        fold_rows = list(csv.DictReader(f))
    assert [(r["method"], r["fold"], r["below_base"]) for r in fold_rows][-2:] == [("lora_c", "0", "0"), ("lora_c", "1", "1")]
    assert "percentile method" in text and "Wilcoxon" in text and "Dice by lesion volume bin" in text
    assert float(rows["lora_c"]["dice_bin[0-3 mL]"]) == pytest.approx(np.mean(DICE["lora_c"][:2]))  # true 1, 2 mL
    for key in ("dice_by_method", "dice_vs_volume"):  # PNG at 300 dpi, SVG and PDF beside it
        assert paths[key].read_bytes()[:4] == b"\x89PNG"
        assert b"<svg" in paths[f"{key}_svg"].read_bytes()[:400] and paths[f"{key}_pdf"].read_bytes()[:5] == b"%PDF-"
        from PIL import Image

        with Image.open(paths[key]) as image:
            assert round(image.info["dpi"][0]) == 300


def test_holm_against_a_hand_computed_example():
    """p = (0.01, 0.04, 0.03, 0.005), m = 4, sorted 0.005 0.01 0.03 0.04: x4 = 0.02, x3 = 0.03, x2 = 0.06,
    x1 = 0.04 -> 0.06 (the running maximum keeps the order); NaN is no test and leaves m at 4."""
    assert holm([0.01, 0.04, math.nan, 0.03, 0.005]) == pytest.approx([0.03, 0.06, math.nan, 0.06, 0.02], nan_ok=True)
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.2]) == pytest.approx([0.2]) and holm([]).size == 0


def test_dice_axis_spans_the_data_not_zero():
    low, high = _dice_limits(np.array([0.62, 0.70, 0.55, math.nan]))
    assert (low, high) == pytest.approx((0.55 - 0.015 - 0.005, 0.70 + 0.02))  # margin max(10% of 0.15, 0.02)
    assert _dice_limits(np.array([0.01, 0.99])) == (0.0, 1.0) and _dice_limits(np.array([math.nan])) == (0.0, 1.0)


def test_structure_name_from_the_dataset_labels(tmp_path):
    """The dataset's foreground label names replace 'lesion' in the report's text and plot titles."""
    _write(tmp_path / "named", "lora_c", "lora_c", DICE["lora_c"], base=DICE["none"],
           labels={"0": "background", "1": "anterior", "2": "posterior"})
    text = write_report(tmp_path / "named")["markdown"].read_text(encoding="utf-8")
    assert "(anterior + posterior)" in text.splitlines()[0] and "Dice by anterior + posterior volume bin" in text
    assert "lesion" not in text
    svg = (tmp_path / "named" / "dice_vs_volume.svg").read_text(encoding="utf-8")
    assert "true anterior + posterior volume (mL)" in svg and "named: Dice against true anterior + posterior volume" in svg
    _write(tmp_path / "v2", "lora_c", "lora_c", DICE["lora_c"], labels={"background": 0, "hippocampus": 1})
    assert "(hippocampus)" in write_report(tmp_path / "v2")["markdown"].read_text(encoding="utf-8").splitlines()[0]
    _write(tmp_path / "unnamed", "lora_c", "lora_c", DICE["lora_c"], base=DICE["none"])  # no run folder says: lesion
    assert "(lesion)" in write_report(tmp_path / "unnamed")["markdown"].read_text(encoding="utf-8").splitlines()[0]


def test_folds_trained_with_different_settings_are_flagged(tmp_path):
    """A 1500-step fold and a 2-step fold of one method: a warning naming the setting, the row flagged in report.md
    and report.csv. Folds that differ only in their per-fold keys (fold, seed, run_dir, datamodule.fold) and in
    settings that change nothing computed (num_workers, progress bar) are not flagged."""
    _write(tmp_path, "lora_c", "lora_c", DICE["lora_c"], base=DICE["none"], configs=[_config(0), _config(1, 2)])
    _write(tmp_path, "lora_c_same", "lora_c", DICE["lora_c"], base=DICE["none"],
           configs=[_config(0, run_dir="a"), _config(1, run_dir="b")])
    with pytest.warns(UserWarning, match=r"method 'lora_c' pools folds trained with different settings "
                                         r"\(fold 1: trainer.max_steps: 1500 -> 2\)") as caught:
        paths = write_report(tmp_path)
    assert len([w for w in caught if "different settings" in str(w.message)]) == 1
    _, rows = _rows(paths["csv"])
    assert rows["lora_c"]["settings_differ"] == "fold 1: trainer.max_steps: 1500 -> 2"
    assert rows["lora_c_same"]["settings_differ"] == ""
    text = paths["markdown"].read_text(encoding="utf-8")
    assert "lora_c ⚠³" in _markdown_rows(text) and "lora_c_same" in _markdown_rows(text)
    assert "³ `lora_c` pools folds trained with different settings: `fold 1: trainer.max_steps: 1500 -> 2`." in text


def test_sizes_under_unit_named_keys(tmp_path):
    """Case rows whose sizes are named by their unit (``true_px``; summaries with ``area_abs_err_px``) plot and
    tabulate as the ``*_ml`` ones do."""
    _write(tmp_path, "lora_c", "lora_c", DICE["lora_c"], base=DICE["none"])
    rows, labels = method_rows(collect_runs(tmp_path))
    for row in rows:
        for case in row["cases"]:
            case["pred_px"], case["true_px"] = case.pop("pred_ml"), case.pop("true_ml")
        row["area_abs_err_px"] = row.pop("volume_abs_err_ml")
    table = report_table(rows, labels)
    assert "area_abs_err_px" in table.columns and "volume_abs_err_ml" not in table.columns
    path = plot_dice_vs_volume(rows, [0.0, 3.0, math.inf], tmp_path / "v.png", unit="px", structure="vessel")
    assert b"true vessel area (px)" in path.with_suffix(".svg").read_bytes()


def test_a_corrupt_metrics_file_is_one_line_naming_it(tmp_path):
    _write(tmp_path, "lora_c", "lora_c", DICE["lora_c"])
    bad = tmp_path / "lora_c" / "fold1" / "metrics.json"
    bad.write_text('{"run": {"fold": 1}, "cases": [', encoding="utf-8")  # cut short while written
    with pytest.raises(ValueError, match=rf"^{bad} is not readable JSON \(Expecting value: line 1") as error:
        collect_runs(tmp_path)
    assert "\n" not in str(error.value)
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{bad} holds a JSON list, not a run's metrics$"):
        collect_runs(tmp_path)


def test_base_row_from_the_runs_and_nested_layouts(tmp_path):
    """Without `none` runs the base comes from the runs' base_cases; method folders one level deeper (one
    folder per model) give the same table, or per-model methods when there are several models."""
    flat, nested, two = tmp_path / "flat", tmp_path / "nested" / "unet", tmp_path / "two"
    for folder in (flat, nested, two / "unet", two / "vit"):
        _write(folder, "full", "full", DICE["full"], base=DICE["none"])
        _write(folder, "lora_c_r2", "lora_c", DICE["lora_c"], base=DICE["none"])
    (tmp_path / "nested" / "base" / "fold0").mkdir(parents=True)  # a pretraining run in the tree is left out
    pretraining = json.dumps({"run": {"experiment": "pretrain"}})
    (tmp_path / "nested" / "base" / "fold0" / "metrics.json").write_text(pretraining, encoding="utf-8")
    _, rows = _rows(write_report(flat)["csv"])
    assert list(rows) == ["none", "full", "lora_c_r2"] and rows["none"]["base_from_runs"] == "1"
    assert float(rows["none"]["dice_mean"]) == pytest.approx(np.mean(DICE["none"]))
    assert float(rows["lora_c_r2"]["p_vs_none"]) == pytest.approx(2 / 2**6)
    nested_rows = _rows(write_report(tmp_path / "nested")["csv"])[1]
    assert nested_rows == rows
    _, per_model = _rows(write_report(two)["csv"])
    assert list(per_model) == ["unet/none", "unet/full", "unet/lora_c_r2", "vit/none", "vit/full", "vit/lora_c_r2"]
    assert per_model["vit/lora_c_r2"]["p_vs_full"] == rows["lora_c_r2"]["p_vs_full"] != ""
    assert "no `none` runs" in (flat / "report.md").read_text(encoding="utf-8")


def test_plots_give_each_method_its_own_colour_and_name_the_base(tmp_path):
    """Distinct colours (the base grey, every other method its own hue) for up to 20 adapted methods, the same
    in both plots; the plots read back as PNGs of the size their layout gives."""
    for i in range(20):
        _write(tmp_path, f"m{i:02d}", "lora_c", DICE["lora_c"], base=DICE["none"])
    rows, _ = method_rows(collect_runs(tmp_path))
    colours = _colours(rows)
    assert rows[0]["method"] == "none" and colours[0] == "0.45"
    assert len({tuple(c) for c in colours[1:]}) == 20 and all(len(set(c[:3])) > 1 for c in colours[1:])  # no greys
    paths = write_report(tmp_path)
    from PIL import Image

    for key in ("dice_by_method", "dice_vs_volume"):
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and image.width > 600
