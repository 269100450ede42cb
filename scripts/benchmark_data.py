"""Data-path benchmark on the phantom: samples/s uncached vs cached, and the share of a training step
spent waiting for data.

Modes: 'none' (read + preprocess every visit), 'memory' (MONAI CacheDataset), 'disk' (MONAI
PersistentDataset; 'disk-cold' is its first pass, which writes the cache). Training set of fold 0, 3D
patches 64x64x32, 4 per volume, augmentation on.

* samples/s: one pass over the dataset in the main process with one torch thread (as in a DataLoader
  worker), median of `--rounds` rounds that interleave the modes, so all modes see the same load;
* waiting for data: `--steps` training steps of a small MONAI 3D UNet (Adam, Dice-CE) fed by a DataLoader
  with 0 or 2 workers; wait = time blocked in ``next(loader)``; fraction = wait / (wait + compute).

    python scripts/benchmark_data.py [--cases 12] [--rounds 3] [--steps 10] [--json outputs/benchmark_data.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from monai.data import DataLoader
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from segadapt.data import PreprocessConfig, disk_cache_dir, fold_datasets, load_or_create_splits, make_phantom_dataset
from segadapt.errors import exits_on_user_error

MODES = ("none", "memory", "disk")


def _samples_per_second(dataset) -> float:
    """One pass in this process with one torch thread; every item is a list of patches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        samples = sum(len(dataset[i]) for i in range(len(dataset)))
        return samples / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def _wait_fraction(dataset, workers: int, batch: int, steps: int, in_channels: int) -> tuple[float, float]:
    """(share of the step spent in next(loader), mean step seconds) over `steps` UNet training steps."""
    torch.manual_seed(0)
    model = UNet(3, in_channels, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    wait = compute = 0.0
    iterator, done = iter(loader), 0
    while done < steps:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            continue
        fetched = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(item["image"].as_tensor()), item["label"].as_tensor()).backward()
        optimizer.step()
        wait, compute, done = wait + fetched - start, compute + time.perf_counter() - fetched, done + 1
    return wait / (wait + compute), (wait + compute) / steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=12, help="phantom tbi cases (default grid 96x96x40)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds (median)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per wait measurement")
    parser.add_argument("--batch", type=int, default=2, help="volumes per batch (x 4 patches each)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--json", type=Path, default=Path("outputs/benchmark_data.json"))
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="segadapt-bench-"))
    try:
        dataset_json = make_phantom_dataset(work / "tbi", "tbi", args.cases, seed=0)
        load_or_create_splits(dataset_json, n_folds=3)  # once, outside the timed builds
        configs = {m: PreprocessConfig(cache=m, cache_dir=str(work / "cache"), patch_size=[64, 64, 32]) for m in MODES}
        datasets, build = {}, {}
        for mode, cfg in configs.items():
            start = time.perf_counter()
            datasets[mode] = fold_datasets(dataset_json, 0, cfg, n_folds=3)[0]
            build[mode] = time.perf_counter() - start
        cold = _samples_per_second(datasets["disk"])  # first pass writes the disk cache
        rates = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                rates[mode].append(_samples_per_second(datasets[mode]))
        rows = [{"mode": "disk-cold", "build_s": build["disk"], "samples_per_s": cold}]
        rows += [{"mode": m, "build_s": build[m], "samples_per_s": statistics.median(rates[m])} for m in MODES]
        for row in rows:
            mode = row["mode"]
            for workers in args.workers:
                if mode == "disk-cold":
                    shutil.rmtree(disk_cache_dir(configs["disk"], "phantom_tbi"))
                dataset = fold_datasets(dataset_json, 0, configs[mode.split("-")[0]], n_folds=3)[0]
                fraction, step = _wait_fraction(dataset, workers, args.batch, args.steps, configs["none"].in_channels)
                row[f"wait_fraction_w{workers}"], row[f"step_s_w{workers}"] = fraction, step
            print(row, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = rows[1]["samples_per_s"]
    print(f"\n{args.cases} phantom tbi volumes (96x96x40), fold-0 train set, 3D patches 64x64x32 x 4 per volume with "
          f"augmentation; samples/s: median of {args.rounds} interleaved rounds, one process, one torch thread; "
          f"waiting: {args.steps} steps of UNet(8,16,32), batch {args.batch} volumes, torch threads "
          f"{torch.get_num_threads()}\n")
    head = " | ".join(f"waiting, {w} workers" for w in args.workers)
    print(f"| data path | dataset build s | samples/s | x uncached | {head} |")
    print("|---|---|---|---|" + "---|" * len(args.workers))
    for r in rows:
        waits = " | ".join(f"{r[f'wait_fraction_w{w}']:.0%} of {r[f'step_s_w{w}']:.2f} s" for w in args.workers)
        speed = f"{r['samples_per_s']:.1f} | {r['samples_per_s'] / base:.2f}"
        print(f"| {r['mode']} | {r['build_s']:.2f} | {speed} | {waits} |")
    result = {"cases": args.cases, "rounds": args.rounds, "steps": args.steps, "batch": args.batch, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    exits_on_user_error(main)()
