"""Fold ensemble on one shared base vs K separate models: time and peak memory, measured side by side.

* ensemble: one :class:`segadapt.inference.Predictor` -- the base plus the K fold adapters, each folded
  into the weights in turn (``segadapt.adapters.fold.folded``), probabilities averaged.
* switched: the same network, each adapter made active in turn with ``set_active_adapter`` and run
  unmerged (it rebuilds its weight in every forward call): what folding saves.
* separate: K plain networks, each the base with one fold's adapter merged in
  (``segadapt.export.merged.export_merged``: plain layers, the fastest one model runs), run one after the other,
  probabilities averaged.

Every measurement runs in a fresh Python process (peak RSS is per process); the kinds take turns, in a
rotating order over the rounds. Per process: load time (network(s) built and loaded), predict time
(median of the timed repeats, one preprocessed volume), peak memory above the RSS after the imports
(CPU: the process's VmHWM; CUDA: ``torch.cuda.max_memory_allocated``), and the parameter memory of the
loaded network(s). Printed: medians and the ratios to the ensemble; written as JSON.

    python scripts/benchmark_ensemble.py                        # demo runs (default model size), K=3, CPU
    python scripts/benchmark_ensemble.py --members 5 --channels 32 64 128 256 512 --shape 64 64 32   # a wider base
    python scripts/benchmark_ensemble.py --runs runs/phantom_sah/multiview_unet/cp_lora/fold{0,1,2} \
        --input /path/ct.nii.gz --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from segadapt.adapters import set_active_adapter
from segadapt.data import inference_transforms, make_phantom_dataset
from segadapt.io import write_json
from segadapt.errors import exits_on_user_error
from segadapt.export.merged import export_merged
from segadapt.inference import Predictor
from segadapt.training.callbacks import peak_rss_mb, reset_peak_rss
from segadapt.training.demo import make_demo_runs

KINDS = ("ensemble", "switched", "separate")
# The model scripts/train.py trains by default.
MODEL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "multiview_unet.yaml"
DEFAULT_MODEL = OmegaConf.to_container(OmegaConf.load(MODEL_CONFIG))["kwargs"]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def worker(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads)
    start_rss = rss_mb()
    reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    started = time.perf_counter()
    if args.worker in ("ensemble", "switched"):
        predictors = [Predictor.from_runs(args.runs, device=args.device)]
    else:
        config = Predictor.from_runs(args.runs[:1], device="cpu").config  # only the run config is needed
        predictors = [Predictor(config, base=path, device=args.device) for path in args.merged]
    load_s = time.perf_counter() - started
    params_mb = sum(p.numel() * p.element_size() for q in predictors for p in q.module.net.state_dict().values()) / 2**20
    image = inference_transforms(predictors[0].preprocess, predictors[0].channels)({"image": args.input})["image"][None]

    def one(predictor: Predictor) -> torch.Tensor:
        if args.worker != "switched":
            return predictor.predict_probabilities(image)
        total = 0
        for name in predictor.members:  # unmerged: every forward call rebuilds each adapted weight
            set_active_adapter(predictor.module.net, name)
            total = total + predictor.module.predict_probabilities(image)
        return total / len(predictor.members)

    @torch.no_grad()
    def run() -> torch.Tensor:
        total = sum(one(q) for q in predictors) / len(predictors)
        if cuda:
            torch.cuda.synchronize(args.device)
        return total

    probabilities = run()  # warm-up
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(args.device) / 2**20 if cuda else peak_rss_mb() - start_rss
    np.save(args.save, probabilities.float().cpu().numpy())
    print(json.dumps({"load_s": load_s, "predict_s": statistics.median(times), "peak_mb": peak, "params_mb": params_mb}))


def measure(kind: str, args: argparse.Namespace, merged: list[Path], save: Path) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--runs", *map(str, args.runs), "--input", str(args.input),
               "--device", args.device, "--threads", str(args.threads), "--repeats", str(args.repeats), "--save", str(save),
               "--merged", *map(str, merged)]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, help="fold run folders (default: demo runs, default model size)")
    parser.add_argument("--members", type=int, default=3, help="K for the demo runs")
    parser.add_argument("--channels", type=int, nargs="+", default=DEFAULT_MODEL["channels"], help="demo runs' UNet widths")
    parser.add_argument("--input", type=Path, help="a scan (default: a phantom head CT of --shape)")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 40], help="phantom scan shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (1: steadier timings on a shared CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed predictions per process")
    parser.add_argument("--work", type=Path, default=Path("outputs/benchmark_ensemble"))
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark_ensemble.json"))
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--merged", nargs="*", type=Path, default=[], help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    if args.runs is None:
        model = {**DEFAULT_MODEL, "channels": args.channels, "strides": [2] * (len(args.channels) - 1)}
        name = f"demo_k{args.members}_" + "-".join(map(str, args.channels))
        args.runs = make_demo_runs(args.work / name, members=args.members, model_kwargs=model, steps=(2, 2))
    if args.input is None:
        spacing = [220.0 / args.shape[0], 220.0 / args.shape[1], 160.0 / args.shape[2]]
        dataset = make_phantom_dataset(args.work / ("scan_" + "x".join(map(str, args.shape))), "sah", 1, shape=args.shape,
                                       spacing=spacing)
        args.input = dataset.parent / "imagesTr" / "sah_000.nii.gz"
    ensemble = Predictor.from_runs(args.runs, device="cpu")
    architecture = ensemble.config["module"]
    merged = [export_merged(ensemble.module.net, args.work / f"merged_{name}.safetensors", name, architecture)
              for name in ensemble.members]
    del ensemble

    results: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for r in range(args.rounds):
        for kind in KINDS[r % len(KINDS):] + KINDS[: r % len(KINDS)]:
            results[kind].append(measure(kind, args, merged, args.work / f"{kind}.npy"))
            print(f"round {r}: {kind:8s} " + "  ".join(f"{k} {v:.3f}" for k, v in results[kind][-1].items()), flush=True)
    reference = np.load(args.work / "ensemble.npy")
    difference = {kind: float(np.abs(np.load(args.work / f"{kind}.npy") - reference).max()) for kind in KINDS[1:]}

    medians = {kind: {key: statistics.median(row[key] for row in rows) for key in rows[0]} for kind, rows in results.items()}
    ratios = {kind: {key: medians[kind][key] / medians["ensemble"][key] for key in medians[kind]} for kind in KINDS[1:]}
    k = len(args.runs)
    print(f"\nK = {k} folds, input {args.input}, device {args.device} ({args.threads} thread(s)), "
          f"{args.rounds} rounds (medians):")
    print(f"{'':10s} {'load s':>8s} {'predict s':>10s} {'peak MB':>9s} {'params MB':>10s}")
    for kind, m in medians.items():
        print(f"{kind:10s} {m['load_s']:8.2f} {m['predict_s']:10.3f} {m['peak_mb']:9.1f} {m['params_mb']:10.2f}")
    for kind, ratio in ratios.items():
        print(f"{kind} / ensemble: load x{ratio['load_s']:.2f}, predict x{ratio['predict_s']:.2f}, peak memory "
              f"x{ratio['peak_mb']:.2f}, parameters x{ratio['params_mb']:.2f}; max |p - p_ensemble| {difference[kind]:.1e}")
    write_json(args.out, {"members": k, "runs": [str(r) for r in args.runs], "input": str(args.input),
                          "device": args.device, "threads": args.threads, "rounds": results, "medians": medians,
                          "ratios_to_ensemble": ratios, "max_abs_probability_difference": difference})
    print(f"-> {args.out}")


if __name__ == "__main__":
    exits_on_user_error(main)()
