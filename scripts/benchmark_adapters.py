"""Training-step cost of every adapter method on a MONAI 3D UNet, measured side by side in one run.

Each configuration (the floor, full fine-tuning, PEFT's LoRA / DoRA, and every segadapt method in
each computation order) gets its own copy of one UNet. Rounds interleave the configurations in a
shuffled order; each round times one training step (forward + loss + backward + AdamW step) per
configuration; the table reports medians and ratios to

* the floor: frozen base, forward + input-gradient backward (no parameter gradients at all),
* full fine-tuning of every parameter,
* PEFT's equivalent method (LoRA for lora/conv_lora, DoRA for conv_dora) with the same targets.

``compute="auto"`` measures both orders per layer at its first call (``segadapt/adapters/calibration.py``),
i.e. in the warm-up steps; ``SEGADAPT_AUTO_COMPUTE=cost_model`` benchmarks the FLOP model instead. The
table adds, per configuration, the spread of its per-round ratio to full fine-tuning (noise) and, for
auto, its step over the faster fixed order.

Peak memory (one extra step per configuration after the timed rounds): on CUDA,
``torch.cuda.max_memory_allocated`` above the memory held before the step; on CPU, the peak resident
set size sampled every 0.5 ms above the RSS before the step (glibc's mmap
threshold is pinned so that freed tensors go back to the OS at once).

    python scripts/benchmark_adapters.py                       # CPU fp32, 96^3, 7 rounds
    python scripts/benchmark_adapters.py --device cuda          # CUDA, bf16 autocast
    python scripts/benchmark_adapters.py --size 64 --rounds 3   # quicker
    python scripts/benchmark_adapters.py --threads 1 --clock cpu  # CPU time: steadier on a shared machine
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import random
import statistics
import threading
import time
from pathlib import Path

import torch
from monai.networks.nets import UNet
from torch import nn

from segadapt.adapters import METHODS, AdaptedLayer, AdapterConfig, inject
from segadapt.errors import exits_on_user_error

ACTIVATION_CAPABLE = ("conv_lora", "conv_dora", "cp_lora", "cp_dora", "salt")
PEFT_EQUIVALENT = {"lora": "peft_lora", "conv_lora": "peft_lora", "conv_dora": "peft_dora"}


def build_unet(channels: tuple[int, ...]) -> nn.Module:
    strides = (2,) * (len(channels) - 1)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=channels, strides=strides, num_res_units=2)


def conv_targets(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv3d)]


def make_configs(base: nn.Module, rank: int, methods: list[str], peft: bool) -> dict[str, nn.Module]:
    """name -> model ready to train (trainable parameters set)."""
    targets = conv_targets(base)
    configs: dict[str, nn.Module] = {}
    floor = copy.deepcopy(base).requires_grad_(False)
    configs["floor"] = floor
    configs["full"] = copy.deepcopy(base).requires_grad_(True)
    for method in methods:
        orders = ("auto", "weight", "activation") if method in ACTIVATION_CAPABLE else ("auto",)
        for order in orders:
            model = copy.deepcopy(base)
            # SALT cannot exceed a layer's singular values (the 2-channel output conv has 2)
            pattern = {}
            if method == "salt":
                for name in targets:
                    conv = model.get_submodule(name)
                    q = min(conv.out_channels, conv.in_channels * conv.weight[0, 0].numel())
                    if q < rank:
                        pattern[name] = q
            inject(model, AdapterConfig(method=method, rank=rank, alpha=rank, targets=targets, rank_pattern=pattern, compute=order))
            configs[method if order == "auto" else f"{method} [{order}]"] = model
    if peft:
        from peft import LoraConfig, get_peft_model

        for name, dora in (("peft_lora", False), ("peft_dora", True)):
            model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, use_dora=dora))
            configs[name] = model
    return configs


class PeakRSS:
    """Peak resident memory (bytes) of this process while the context is open, sampled in a thread."""

    def __init__(self, interval: float = 5e-4):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def pin_malloc_mmap_threshold() -> None:
    """glibc: serve allocations >= 128 KiB by mmap and never raise that threshold, so freed tensors
    leave the RSS at once and per-step peaks are comparable (M_MMAP_THRESHOLD = -3)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
    except OSError:
        pass


def training_step(name: str, model: nn.Module, optimizer, x, target, device: str) -> None:
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")
    inputs = x.clone().requires_grad_(name == "floor")
    with autocast:
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.float(), target)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def measure_seconds(name, model, optimizer, x, target, device, clock) -> float:
    """Seconds of one training step: wall clock, or (``clock="cpu"``, CPU only) this process's CPU time,
    which other processes' load does not inflate (all torch threads included)."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    if device == "cuda":
        torch.cuda.synchronize()
    start = timer()
    training_step(name, model, optimizer, x, target, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return timer() - start


def measure_memory(name, model, optimizer, x, target, device) -> float:
    """Peak extra MB of one training step (a separate step, so that the RSS sampler does not load the timed ones)."""
    if device == "cuda":
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        training_step(name, model, optimizer, x, target, device)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - held) / 2**20
    with PeakRSS() as peak:
        training_step(name, model, optimizer, x, target, device)
    return peak.extra_mb


def computation_orders(model: nn.Module, x: torch.Tensor) -> str:
    """'a/n': how many adapted layers run in activation space for this input (training mode)."""
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    if not layers:
        return ""
    chosen = []
    hooks = [
        layer.register_forward_pre_hook(lambda mod, args: chosen.append(mod.adapters[mod.active_adapter].uses_activation_space(mod.base_layer, args[0])))
        for layer in layers
    ]
    with torch.enable_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return f"{sum(chosen)}/{len(chosen)}"


def auto_vs_fixed(name: str, median_t: dict[str, float]):
    """compute="auto"'s median step over the faster of the two fixed orders (None for other rows)."""
    fixed = [median_t.get(f"{name} [{order}]") for order in ("weight", "activation")]
    if " " in name or None in fixed:
        return None
    return median_t[name] / min(fixed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=96, help="cubic patch edge")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=sorted(set(METHODS) - {"lora"}), help="lora is the same class as conv_lora")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="step time: wall clock, or this process's CPU time (CPU only; steadier on a shared machine)")
    parser.add_argument("--out", default="outputs/benchmark_adapters.json")
    args = parser.parse_args()

    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU time: use it with --device cpu")
    pin_malloc_mmap_threshold()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = args.device
    base = build_unet(tuple(args.channels)).to(device)
    configs = make_configs(base, args.rank, args.methods, peft=not args.no_peft)
    for model in configs.values():
        model.to(device).train()
    optimizers = {
        name: (torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) if name != "floor" else None)
        for name, m in configs.items()
    }
    x = torch.randn(1, 1, args.size, args.size, args.size, device=device)
    target = torch.randint(0, 2, (1, args.size, args.size, args.size), device=device)
    params = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in configs.items()}
    orders = {name: computation_orders(m, x) for name, m in configs.items()}

    for name, model in configs.items():
        for _ in range(args.warmup):
            training_step(name, model, optimizers[name], x, target, device)
    times = {name: [] for name in configs}
    memory = {name: [] for name in configs}
    names = list(configs)
    for round_index in range(args.rounds):
        random.shuffle(names)
        for name in names:
            times[name].append(measure_seconds(name, configs[name], optimizers[name], x, target, device, args.clock))
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    for name in names:
        memory[name].append(measure_memory(name, configs[name], optimizers[name], x, target, device))

    median_t = {name: statistics.median(v) for name, v in times.items()}
    # per-round ratio to full fine-tuning (the two measured in the same round): its spread shows the noise
    round_ratios = {name: [t / f for t, f in zip(v, times["full"])] for name, v in times.items()}
    median_m = {name: statistics.median(v) for name, v in memory.items()}
    rows = []
    for name in configs:
        method = name.split(" ")[0]
        peft_name = PEFT_EQUIVALENT.get(method)
        rows.append(
            {
                "config": name,
                "trainable_params": params[name],
                "activation_layers": orders[name],
                "step_s": median_t[name],
                "x_floor": median_t[name] / median_t["floor"],
                "x_full": median_t[name] / median_t["full"],
                "x_peft": median_t[name] / median_t[peft_name] if peft_name in median_t else None,
                "peak_mb": median_m[name],
                "mem_x_full": median_m[name] / median_m["full"] if median_m["full"] > 0 else None,
                "x_full_spread": (min(round_ratios[name]), max(round_ratios[name])),
                "auto_x_best_fixed": auto_vs_fixed(name, median_t),
            }
        )
    header = (
        f"MONAI UNet channels {tuple(args.channels)}, {args.size}^3 patch, batch 1, rank {args.rank} on all "
        f"{len(conv_targets(base))} Conv3d, {device} {'bf16 autocast' if device == 'cuda' else 'fp32'}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds, {args.clock} clock"
    )
    lines = [header, "", "| config | trainable | act. layers | step s | x floor | x full FT | x full FT per round | auto x best fixed | x PEFT | peak MB | mem x full FT |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec=".2f": "" if v is None else format(v, spec)
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['trainable_params']:,} | {row['activation_layers']} | {row['step_s']:.3f} | "
            f"{fmt(row['x_floor'])} | {fmt(row['x_full'])} | {row['x_full_spread'][0]:.2f}-{row['x_full_spread'][1]:.2f} | "
            f"{fmt(row['auto_x_best_fixed'])} | {fmt(row['x_peft'])} | {row['peak_mb']:.0f} | {fmt(row['mem_x_full'])} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": header, "args": vars(args), "rows": rows, "times": times, "memory_mb": memory}, indent=2), encoding="utf-8")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    exits_on_user_error(main)()
