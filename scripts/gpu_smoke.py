"""GPU smoke test: every adapter method trains under bf16 autocast on CUDA and merges exactly.

For each method, on a MONAI 3D UNet on the GPU: a few AdamW steps with bf16 autocast (the loss must
stay finite and fall), then, in fp32 eval, merged output == adapted output, and save -> load into a
fresh base reproduces the output. Prints one line per method and exits non-zero on any failure.

    python scripts/gpu_smoke.py            # needs CUDA
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.networks.nets import UNet

from segadapt.adapters import METHODS, AdapterConfig, inject, load_adapter, merge, save_adapter, unmerge
from segadapt.errors import exits_on_user_error


def main() -> int:
    if not torch.cuda.is_available():
        print("CUDA is not available")
        return 1
    device = "cuda"
    torch.manual_seed(0)
    base = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2).to(device)
    targets = [n for n, m in base.named_modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    x = torch.randn(2, 1, 64, 64, 64, device=device)
    y = (x > 0.5).long()[:, 0]
    failures = 0
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    for method in sorted(METHODS):
        model = copy.deepcopy(base)
        # SALT cannot exceed a layer's singular values: the 2-channel output layers get rank 2
        narrow = {name: 2 for name in targets if 2 in base.get_submodule(name).weight.shape[:2]}
        inject(model, AdapterConfig(method=method, rank=8, lora_rank=8, targets=targets, rank_pattern=narrow))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        losses = []
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(8):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        torch.cuda.synchronize()
        step_ms = 1000 * (time.perf_counter() - start) / len(losses)
        model.eval()
        with torch.no_grad():
            adapted = model(x)
            merge(model)
            merge_err = (model(x) - adapted).abs().max().item()
            unmerge(model)
            with tempfile.TemporaryDirectory() as tmp:
                path = save_adapter(model, Path(tmp) / "a.safetensors")
                fresh = load_adapter(copy.deepcopy(base).eval(), path)
                load_err = (fresh(x) - adapted).abs().max().item()
        scale = adapted.abs().max().item()
        ok = all(map(lambda v: v == v and abs(v) < 1e9, losses)) and losses[-1] < losses[0] and merge_err <= 1e-3 * scale and load_err <= 1e-4 * scale
        failures += not ok
        print(f"{method:10s} {'ok  ' if ok else 'FAIL'} loss {losses[0]:.4f} -> {losses[-1]:.4f}  step {step_ms:6.1f} ms  merge err {merge_err:.2e}  load err {load_err:.2e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(exits_on_user_error(main)())
