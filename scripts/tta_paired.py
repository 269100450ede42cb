"""Test-time mirroring (``model.inference.tta``) off vs on, paired, on the same trained networks.

TTA is inference-only, so every finished run folder under EXPERIMENT (``<method>/fold<k>`` or
``<model>/<method>/fold<k>``) is scored twice on its fold's validation cases by the module's own validation
(:func:`segadapt.training.run.load_run` + the run's ``SegDataModule`` + ``Trainer.validate``, as
``fit_run`` scores it): once as trained (no mirroring; it must give back the Dice of ``metrics.json`` exactly,
else the script stops), once with ``tta`` on along ``--mirror-axes`` (default: the axes training flips,
``segadapt.data.transforms.flip_axes``, i.e. what ``model.inference.tta=true`` would use).

Per method, over the validation cases of all folds pooled: mean Dice off and on, the mean paired difference
and the two-sided Wilcoxon signed-rank p (``segadapt.training.report.paired_p``); the same with each fold's
chosen postprocessing (``metrics.json`` ``postprocessing``: largest component kept or not) applied to both.

    python scripts/tta_paired.py /work/bench/runs/hippocampus --out /work/bench/tta.json
    python scripts/tta_paired.py /work/bench/runs/hippocampus --mirror-axes 0 1 2   # nnU-Net's 3 axes

With ``--out``, the runs already scored there (same folder and ``--mirror-axes``) are not scored again.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np

from segadapt.data.config import PreprocessConfig
from segadapt.data.transforms import flip_axes
from segadapt.training.datamodule import SegDataModule
from segadapt.training.postprocessing import choose_postprocessing
from segadapt.runs import read_metrics, read_run_config
from segadapt.training.config import configure_threads
from segadapt.training.load import load_run
from segadapt.training.report_stats import paired_p

EVALUATION_KEYS = ("accelerator", "devices", "precision", "deterministic", "inference_mode")  # as fit_run's scorer


def postprocessed_dice(counts: dict, largest_component: list[bool]) -> float:
    """Foreground Dice of one case with the chosen classes' largest component kept (postprocessing.py's formula)."""
    picked = [counts["with" if keep else "without"][c] for c, keep in enumerate(largest_component)]
    pred, overlap = sum(p[1] for p in picked), sum(p[2] for p in picked)
    return 1.0 if pred + counts["foreground"] == 0 else 2.0 * overlap / (pred + counts["foreground"])


def score(run_dir: Path, axes: list[int] | None) -> dict[str, dict]:
    """case id -> {dice, components} of the run's network on its fold's validation cases (axes None: no mirroring)."""
    module, config = load_run(run_dir)
    configure_threads(config["run"].get("threads"))
    module.hparams.tta = axes is not None
    module.hparams.mirror_axes = axes
    datamodule = SegDataModule(**config["datamodule"])
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         **{k: v for k, v in config["trainer"].items() if k in EVALUATION_KEYS})
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return {r["case_id"]: {"dice": r["dice"], "components": module.component_counts.get(r["case_id"])}
            for r in module.case_rows}


def evaluate_run(run_dir: Path, mirror_axes: list[int] | None) -> dict:
    """Off and on scores of one run, the off scores checked against metrics.json's."""
    metrics = read_metrics(run_dir)
    config = read_run_config(run_dir)
    axes = flip_axes(PreprocessConfig.from_dict(config["datamodule"]["preprocess"])) if mirror_axes is None else mirror_axes
    off, on = score(run_dir, None), score(run_dir, axes)
    stored = {c["case_id"]: c["dice"] for c in metrics["cases"]}
    worst = max(abs(off[k]["dice"] - stored[k]) for k in stored)
    if set(off) != set(stored) or worst > 1e-9:
        raise SystemExit(f"error: {run_dir}: the re-scored network does not give metrics.json's Dice back "
                         f"(largest difference {worst:.3g}); not comparing")
    choice = metrics.get("postprocessing") or choose_postprocessing({k: v["components"] for k, v in off.items()})
    keep = list(choice["largest_component"])
    rows = {k: {"off": off[k]["dice"], "on": on[k]["dice"],
                "off_pp": postprocessed_dice(off[k]["components"], keep),
                "on_pp": postprocessed_dice(on[k]["components"], keep)} for k in sorted(off)}
    return {"run_dir": str(run_dir), "method": run_dir.parent.name, "fold": run_dir.name, "mirror_axes": axes,
            "postprocessing": {"largest_component": keep, "stored": bool(metrics.get("postprocessing")),
                               "dice_with": choice["dice_with"], "dice_without": choice["dice_without"]},
            "cases": rows}


def method_rows(runs: list[dict]) -> list[dict]:
    """Per method: pooled means off / on (raw and postprocessed), mean paired difference, Wilcoxon p."""
    table = []
    for method in dict.fromkeys(r["method"] for r in runs):
        cases = {k: v for r in runs if r["method"] == method for k, v in r["cases"].items()}
        row = {"method": method, "n": len(cases)}
        for suffix in ("", "_pp"):
            off = {k: v["off" + suffix] for k, v in cases.items()}
            on = {k: v["on" + suffix] for k, v in cases.items()}
            row["off" + suffix], row["on" + suffix] = float(np.mean(list(off.values()))), float(np.mean(list(on.values())))
            row["diff" + suffix] = row["on" + suffix] - row["off" + suffix]
            row["p" + suffix] = paired_p(on, off)
            row["better" + suffix] = sum(on[k] > off[k] for k in cases)
        table.append(row)
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| method | n | Dice off | Dice on | on - off | cases on > off | Wilcoxon p | Dice off (pp) | Dice on (pp) | p (pp) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        p = lambda v: "n/a" if math.isnan(v) else f"{v:.3g}"  # noqa: E731
        lines.append(f"| {r['method']} | {r['n']} | {r['off']:.4f} | {r['on']:.4f} | {r['diff']:+.4f} | {r['better']} | "
                     f"{p(r['p'])} | {r['off_pp']:.4f} | {r['on_pp']:.4f} | {p(r['p_pp'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", type=Path, help="experiment folder holding <method>/fold<k> run folders")
    parser.add_argument("--mirror-axes", type=int, nargs="+", help="spatial axes to mirror (default: the run's flip axes)")
    parser.add_argument("--out", type=Path, help="write the per-case scores and the table as JSON here")
    args = parser.parse_args(argv)
    folders = sorted(p.parent for p in args.experiment.rglob("fold*/metrics.json"))
    if not folders:
        raise SystemExit(f"error: no finished run folder (fold<k>/metrics.json) under {args.experiment}")
    # runs already scored into --out (same folder, same --mirror-axes) are kept: a later call adds the new ones
    done = json.loads(args.out.read_text(encoding="utf-8"))["runs"] if args.out and args.out.is_file() else []
    done = {r["run_dir"]: r for r in done if r["requested_axes"] == args.mirror_axes}
    runs = []
    for folder in folders:
        runs.append(done.get(str(folder)) or {**evaluate_run(folder, args.mirror_axes), "requested_axes": args.mirror_axes})
        if args.out:
            args.out.write_text(json.dumps({"runs": runs}, indent=1), encoding="utf-8")
        r = runs[-1]
        print(f"{folder}: off {np.mean([c['off'] for c in r['cases'].values()]):.4f} "
              f"on {np.mean([c['on'] for c in r['cases'].values()]):.4f} "
              f"(axes {r['mirror_axes']}; largest component {r['postprocessing']['largest_component']})", flush=True)
    table = method_rows(runs)
    print(markdown(table))
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "table": table}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
