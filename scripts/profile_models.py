"""Profile every model at its default/typical configuration: parameters, adapter presets, CPU forward time.

Prints a markdown table and writes ``outputs/profile_models.{json,md}``. Each round runs one forward per
model (eval mode, ``torch.inference_mode``); ``--repeats`` interleaved rounds follow two warm-up rounds.
The best time is the least disturbed by other jobs on a shared machine; the median is kept beside it.

    .venv/bin/python scripts/profile_models.py               # typical sizes (a few minutes on 2 cores)
    .venv/bin/python scripts/profile_models.py --small       # smaller inputs, quick check
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from segadapt.io import atomic_path, write_json
from segadapt.errors import exits_on_user_error
from segadapt.models import build_model, target_presets
from segadapt.models.registry import spec_of

# (row name, build_model name, kwargs, input shape at typical size, input shape with --small)
CASES = [
    ("multiview_unet (shared), one slice", "multiview_unet", {}, (1, 1, 512, 512), (1, 1, 128, 128)),
    ("multiview_unet (shared), volume", "multiview_unet", {}, (1, 1, 256, 256, 32), (1, 1, 64, 64, 16)),
    ("multiview_unet (per view), volume", "multiview_unet", {"shared_weights": False},
     (1, 1, 256, 256, 32), (1, 1, 64, 64, 16)),
    ("unet3d", "unet3d", {}, (1, 1, 96, 96, 96), (1, 1, 48, 48, 48)),
    ("dynunet", "dynunet", {}, (1, 1, 96, 96, 96), (1, 1, 48, 48, 48)),
    ("vit_seg vit_base_patch16_224", "vit_seg", {"encoder": "vit_base_patch16_224", "in_channels": 3},
     (1, 3, 224, 224), (1, 3, 224, 224)),
    ("vit_seg samvit_base_patch16", "vit_seg", {"encoder": "samvit_base_patch16", "in_channels": 3, "img_size": 512},
     (1, 3, 512, 512), (1, 3, 256, 256)),  # 512 px as in SAMed
]


def forward_call(model: torch.nn.Module, x: torch.Tensor):
    """The call timed for a model: a 2D/3D forward, or the multi-view volume predictor for 5D input."""
    if spec_of(model).multi_view and x.ndim == 5:
        return lambda: model.predict_volume(x, slice_batch_size=16)
    if spec_of(model).multi_view:
        return lambda: model(x, view="axial")
    return lambda: model(x)


def profile(small: bool, repeats: int) -> list[dict]:
    rows, calls = [], []
    for label, name, kwargs, typical, reduced in CASES:
        torch.manual_seed(0)
        model = build_model(name, **kwargs).eval()
        shape = reduced if small else typical
        presets = target_presets(model)
        rows.append(
            {
                "model": label,
                "build": {"name": name, **kwargs},
                "parameters": sum(p.numel() for p in model.parameters()),
                "presets": {
                    preset: {
                        "modules": len(names),
                        "base_parameters": sum(p.numel() for n in names for p in model.get_submodule(n).parameters()),
                    }
                    for preset, names in presets.items()
                },
                "input_shape": list(shape),
            }
        )
        calls.append(forward_call(model, torch.randn(shape)))
    # Interleaved rounds after two warm-ups, so that load from other jobs hits every model alike.
    times: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for round_ in range(2 + repeats):
            for call, spent in zip(calls, times):
                start = time.perf_counter()
                call()
                if round_ >= 2:
                    spent.append(time.perf_counter() - start)
            print(f"  round {round_ + 1}/{2 + repeats} done", flush=True)
    for row, spent in zip(rows, times):
        row["forward_s_best"] = min(spent)
        row["forward_s_median"] = statistics.median(spent)
        row["forward_s_all"] = spent
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | parameters | input | CPU forward s, best | median | presets: adapted modules (base params) |",
        "|---|---:|---|---:|---:|---|",
    ]
    for row in rows:
        presets = ", ".join(
            f"{p} {v['modules']} ({v['base_parameters'] / 1e6:.2f}M)" for p, v in row["presets"].items()
        )
        shape = "x".join(map(str, row["input_shape"]))
        times = f"{row['forward_s_best']:.3f} | {row['forward_s_median']:.3f}"
        lines.append(f"| {row['model']} | {row['parameters']:,} | {shape} | {times} | {presets} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="smaller inputs for a quick run")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per model (median reported)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for profile_models.{json,md}")
    args = parser.parse_args()

    rows = profile(args.small, args.repeats)
    table = markdown(rows)
    print(table)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "repeats": args.repeats,
        "small": args.small,
    }
    write_json(args.out / "profile_models.json", {"meta": meta, "models": rows})
    with atomic_path(args.out / "profile_models.md") as tmp:
        tmp.write_text(table + "\n", encoding="utf-8")
    print(f"wrote {args.out / 'profile_models.json'} and {args.out / 'profile_models.md'}")


if __name__ == "__main__":
    exits_on_user_error(main)()
