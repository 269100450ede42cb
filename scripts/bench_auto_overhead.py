"""Trial overhead of ``segadapt auto``, this tree against a git revision, side by side on the same machine.

Runs the same demo search (``--trials 4 --folds 0 trainer.max_steps=100 selection.every_n_steps=25`` on the
phantom, the same TPE seed, so the same configurations) with the code of `--baseline` (``git archive`` into a
temporary folder) and with this tree, alternately, and prints from each ``auto.json``: trials per hour of trial
time, the training-step share of the trials, the summed timing phases of the trial runs, and the ratios
(this tree / baseline). The base is pretrained once and shared.

    python scripts/bench_auto_overhead.py --baseline main --out /tmp/h4bench [--repeats 1] [--base FILE] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = ["--trials", "4", "--folds", "0", "trainer.max_steps=100", "selection.every_n_steps=25"]
PHASES = ("setup_s", "base_scores_s", "data_s", "train_steps_s", "validation_s", "checkpoints_s", "lightning_s")


def export_tree(revision: str, into: Path) -> Path:
    """The package and configs of `revision` (``git archive``) under `into`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "segadapt", "configs"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def search(tree: Path, runs: Path, data: Path, extra: list[str]) -> dict:
    """One demo search with the code in `tree`; its auto.json plus the summed timing of its trial runs."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "segadapt.cli", "auto", "--config-dir", str(tree / "configs"), *DEMO,
               f"paths.runs={runs}", f"paths.data={data}", *extra]
    # cwd=tree: `python -m` puts the working folder first on sys.path, before PYTHONPATH
    subprocess.run(command, env=env, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    record = json.loads((runs / "phantom_sah/auto.json").read_text())
    phases = dict.fromkeys(PHASES, 0.0)
    for trial in record["folds"][0]["trials"]:
        if trial["state"] in ("COMPLETE", "PRUNED"):
            timing = json.loads((Path(trial["run_dir"]) / "metrics.json").read_text())["timing"]
            for phase in PHASES:
                phases[phase] += timing[phase]
    return {"summary": record["summary"], "phases": phases,
            "values": [t["inner_dice"] for t in record["folds"][0]["trials"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main", help="git revision to compare with (default: main)")
    parser.add_argument("--out", required=True, help="an empty folder for the runs")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--base", help="a base checkpoint for every search (default: the first one pretrains it)")
    parser.add_argument("overrides", nargs="*", help="more run settings (e.g. trainer.threads=2)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    data, base = out / "data", Path(args.base).resolve() if args.base else out / "base/base.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline": export_tree(args.baseline, Path(tmp)), "this tree": REPO}
        results: dict[str, list[dict]] = {name: [] for name in trees}
        for repeat in range(args.repeats):
            for name, tree in trees.items():
                runs = out / f"{name.replace(' ', '_')}{repeat}"
                extra = list(args.overrides)
                if base.is_file():
                    extra.append(f"base_checkpoint={base}")
                results[name].append(search(tree, runs, data, extra))
                if not base.is_file():  # the first search pretrained it: the others share it
                    pretrained = next((runs / "base").glob("*/model.safetensors"))
                    base.parent.mkdir(parents=True, exist_ok=True)
                    base.write_bytes(pretrained.read_bytes())
    rows = {}
    for name, runs in results.items():
        n = len(runs)
        rows[name] = {"trials_per_hour": sum(r["summary"]["trials_per_hour"] for r in runs) / n,
                      "training_step_share": sum(r["summary"]["training_step_share"] for r in runs) / n,
                      **{p: sum(r["phases"][p] for r in runs) / n for p in PHASES}}
        print(f"{name:>10}: " + ", ".join(f"{k} {v:.3g}" for k, v in rows[name].items()))
        print(f"{'':>10}  inner Dice of the trials: {[r['values'] for r in runs]}")
    new, old = rows["this tree"], rows["baseline"]
    print("ratio (this tree / baseline): " + ", ".join(f"{k} {new[k] / old[k]:.2f}" for k in new if old[k]))


if __name__ == "__main__":
    main()
