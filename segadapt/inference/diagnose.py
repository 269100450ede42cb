"""Spectral diagnostics of what a tuning did to each layer: ``segadapt diagnose RUN_DIR [RUN_DIR ...]``.

For every Linear / Conv layer whose weight the run changed, with M(W) the Cout x (Cin k^d) matrix view
(:mod:`segadapt.adapters.layers`), W0 the base weight and W the tuned one (an adapter's adapted weight,
or the fine-tuned weight of a ``full`` / ``decoder`` run):

* ``relative_norm`` = ||dW||_F / ||W0||_F with dW = W - W0;
* ``effective_rank`` of dW: exp of the Shannon entropy of its normalised singular values
  p_i = sigma_i / sum_j sigma_j (Roy & Vetterli, 2007): 1 for a rank-one update, n for n equal ones;
* ``intruders``: the number of the top ``top_k`` left singular vectors of M(W) whose cosine similarity
  with *every* left singular vector of M(W0) is below ``epsilon`` -- the "intruder dimensions" of
  Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (2024), whose defaults
  (k = 10, epsilon = 0.5) are used here.

Adapter runs and full fine-tuning runs are read alike (:func:`segadapt.training.load.load_run`: the base
from the run's ``config.yaml``, the tuned network from its weights file), so the two can be compared on
one study. Writes ``diagnose.csv`` and ``diagnose.png`` (one panel per statistic, layers in network
order, one line per run) into ``--out``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from segadapt.adapters import AdaptedLayer
from segadapt.adapters.layers import SUPPORTED_LAYERS, spec_of
from segadapt.io import atomic_path
from segadapt.errors import user_errors
from segadapt.parsers import diagnose_parser

TOP_K, EPSILON = 10, 0.5
COLUMNS = ["run", "layer", "shape", "relative_norm", "effective_rank", "intruders"]


def effective_rank(matrix: torch.Tensor) -> float:
    """exp(H(p)), p = singular values / their sum; 0 for a zero matrix."""
    sigma = torch.linalg.svdvals(matrix.double())
    total = sigma.sum()
    if total == 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def intruder_dimensions(w0: torch.Tensor, w: torch.Tensor, top_k: int = TOP_K, epsilon: float = EPSILON) -> int:
    """How many of the top-``top_k`` left singular vectors of ``w`` have |cos| < ``epsilon`` with every
    left singular vector of ``w0`` (both Cout x n matrices)."""
    u0 = torch.linalg.svd(w0.double(), full_matrices=False).U
    u = torch.linalg.svd(w.double(), full_matrices=False).U[:, :top_k]
    best = (u.t() @ u0).abs().max(dim=1).values  # columns are unit vectors: the products are cosines
    return int((best < epsilon).sum())


def layer_stats(w0: torch.Tensor, w: torch.Tensor, top_k: int = TOP_K, epsilon: float = EPSILON) -> dict[str, float]:
    """The three statistics for one layer (matrices Cout x Cin k^d)."""
    delta = w.double() - w0.double()
    return {
        "relative_norm": float(delta.norm() / w0.double().norm()),
        "effective_rank": effective_rank(delta),
        "intruders": intruder_dimensions(w0, w, top_k, epsilon),
    }


@torch.no_grad()
def effective_weights(net: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: M(W)} of every supported layer, adapted layers with their active adapter applied."""
    weights = {}
    for name, module in net.named_modules():
        if isinstance(module, AdaptedLayer):
            spec, base = module.spec, module.base_layer
            w = spec.canonical(base.weight)
            adapter = module.adapters[module.active_adapter] if module.active_adapter in module.adapters else None
            if adapter is not None and module.merged_adapter is None:
                w = adapter.adapted_weight(w)
        elif isinstance(module, SUPPORTED_LAYERS):
            if getattr(module, "groups", 1) != 1:  # no single matrix view
                continue
            spec = spec_of(module, name)
            w = spec.canonical(module.weight)
        else:
            continue
        weights[name] = w.detach().float().cpu().reshape(spec.cout, spec.fan_in)
    # the base layers inside adapted layers are listed under their own names too: keep the adapted view
    return {n: w for n, w in weights.items() if not n.endswith(".base_layer")}


def diagnose_run(run_dir: str | Path, top_k: int = TOP_K, epsilon: float = EPSILON) -> list[dict[str, Any]]:
    """One row per layer the run changed: run, layer, shape, relative_norm, effective_rank, intruders."""
    from segadapt.training.module import SegAdaptModule
    from segadapt.training.load import load_run

    run_dir = Path(run_dir)
    tuned, config = load_run(run_dir)  # the one builder of a run's network; it refuses an unfinished run
    # W0: the run's network before its weights file is loaded (the adapter at its zero init), which load_run
    # does not return
    base = effective_weights(SegAdaptModule(**config["module"]).net)
    tuned = effective_weights(tuned.net)
    rows = []
    for name, w in tuned.items():
        w0 = base.get(name)
        if w0 is None or w0.shape != w.shape or torch.equal(w0, w):
            continue
        rows.append({"run": str(run_dir), "layer": name, "shape": "x".join(map(str, w.shape)), **layer_stats(w0, w, top_k, epsilon)})
    if not rows:
        raise ValueError(f"run {run_dir} changed no layer weight (an untuned 'none' run?)")
    return rows


def plot(rows: Sequence[dict[str, Any]], path: Path, top_k: int, epsilon: float) -> Path:
    from matplotlib.figure import Figure

    runs = list(dict.fromkeys(r["run"] for r in rows))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    figure = Figure(figsize=(max(6.0, 0.35 * len(layers) + 3.0), 8.0))
    axes = figure.subplots(3, 1, sharex=True)
    labels = {"relative_norm": "||dW|| / ||W0||", "effective_rank": "effective rank of dW",
              "intruders": f"intruder dimensions\n(top {top_k}, cos < {epsilon})"}
    for run in runs:
        by_layer = {r["layer"]: r for r in rows if r["run"] == run}
        x = [i for i, layer in enumerate(layers) if layer in by_layer]
        label = "/".join(Path(run).parts[-2:])
        for ax, key in zip(axes, labels):
            ax.plot(x, [by_layer[layers[i]][key] for i in x], marker="o", markersize=3, linewidth=1, label=label)
    for ax, (key, label) in zip(axes, labels.items()):
        ax.set_ylabel(label)
        if key == "relative_norm":
            ax.set_yscale("log")
    axes[-1].set_xticks(range(len(layers)), layers, rotation=90, fontsize=6)
    axes[0].legend(fontsize=7)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    return path


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return path


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| run | layer | M(W) | ||dW||/||W0|| | eff. rank dW | intruders |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'/'.join(Path(r['run']).parts[-2:])} | {r['layer']} | {r['shape']} | {r['relative_norm']:.3g} "
                     f"| {r['effective_rank']:.2f} | {r['intruders']} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = diagnose_parser()  # in segadapt.parsers: `segadapt diagnose --help` imports no torch
    args = parser.parse_args(argv)
    with user_errors():  # bad input: one line `error: ...`, exit code 2
        if args.top_k < 1 or not 0.0 < args.epsilon <= 1.0:
            raise ValueError(f"--top-k must be >= 1 and --epsilon in (0, 1], got {args.top_k} and {args.epsilon}")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is not a folder")
        rows = [row for run in args.run_dirs for row in diagnose_run(run, args.top_k, args.epsilon)]
        out.mkdir(parents=True, exist_ok=True)
    print(format_table(rows))
    print(f"\n{'csv':>5}: {write_csv(rows, out / 'diagnose.csv')}")
    print(f"{'plot':>5}: {plot(rows, out / 'diagnose.png', args.top_k, args.epsilon)}")
