"""Mutation check of the adapter tests: apply deliberate bugs one at a time and report which test caught each.

    OMP_NUM_THREADS=1 python scripts/mutation_check.py            # all mutants, markdown table on stdout
    python scripts/mutation_check.py --only salt_relu_on_change   # one (or several) by name
    python scripts/mutation_check.py --only truncate_trailing --tests tests/test_adapters_nested.py
    python scripts/mutation_check.py --list

Each mutant is a one-place source edit (an exact snippet replaced by a wrong one). The package and the
tests are copied to a temporary folder, so the working tree is never touched; there the mutant is
applied and the adapter test files run with ``pytest -x``; the first failing test is the one that
caught it. Exit code 1 if a mutant survives (every test passed) or no longer applies (its snippet is
gone: update the list with the code).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_adapters_*.py"))


@dataclass(frozen=True)
class Mutant:
    name: str
    description: str
    path: str  # relative to the repository root
    old: str
    new: str


MUTANTS = [
    Mutant("dora_norm_not_detached", "DoRA's column norm left in the backward (both orders)", "segadapt/adapters/dora.py",
           "        norm = channel_norm(direction.detach())\n", "        norm = channel_norm(direction)\n"),
    Mutant("dora_norm_not_detached_activation", "DoRA's column norm left in the backward (activation space)", "segadapt/adapters/dora.py",
           "        with torch.no_grad():\n            norm = channel_norm(", "        if True:\n            norm = channel_norm("),
    Mutant("lora_c_columns_flipped", "LoRA-C: B A reshaped with its columns flipped", "segadapt/adapters/lora.py",
           "(s * self.lora_B[:, :inner] @ self.lora_A[:inner]).view(self.spec.shape)",
           "(s * self.lora_B[:, :inner] @ self.lora_A[:inner]).flip(1).view(self.spec.shape)"),
    Mutant("salt_relu_on_change", "SALT: ReLU applied to the change of the top values, not to the values", "segadapt/adapters/salt.py",
           "new_top = torch.relu(new_top)", "new_top = top + torch.relu(new_top - top)"),
    Mutant("cp_factors_swapped", "CP: the spatial factors in reverse order", "segadapt/adapters/cp.py",
           "return [self.cp_out, self.cp_in, *self.cp_spatial]", "return [self.cp_out, self.cp_in, *reversed(list(self.cp_spatial))]"),
    Mutant("cp_khatri_rao_order", "CP activation space: Khatri-Rao product of U_in, U_1..U_d in reverse order", "segadapt/adapters/cp.py",
           "khatri_rao_t([f[:, :b] for f in self.factors[1:]])", "khatri_rao_t([f[:, :b] for f in self.factors[1:]][::-1])"),
    Mutant("conv_lora_down_no_dilation", "conv_lora: down conv without the base dilation (unfused dropout path)", "segadapt/adapters/layers.py",
           "hidden = conv_nd(spec, x, down.reshape(k, spec.cin, *spec.kernel), **base_conv_kwargs(base))",
           "hidden = conv_nd(spec, x, down.reshape(k, spec.cin, *spec.kernel), stride=base.stride, padding=base.padding)"),
    Mutant("conv_lora_fused_no_dilation", "conv_lora: fused down conv without the base dilation", "segadapt/adapters/layers.py",
           "list(explicit_padding(base, spec)), list(base.dilation))", "list(explicit_padding(base, spec)), [1] * spec.ndim)"),
    Mutant("tlora_T_not_identity", "TLoRA: T's last ring matrix not the inverse of the others (T != I)", "segadapt/adapters/tlora.py",
           "mats.append(product.t())", "mats.append(product)"),
    Mutant("dora_magnitude_not_norm", "DoRA: magnitude initialised to ones instead of ||W0||_c", "segadapt/adapters/dora.py",
           "self.magnitude = nn.Parameter(channel_norm(spec.canonical(base.weight).detach()).clone())",
           "self.magnitude = nn.Parameter(torch.ones_like(channel_norm(spec.canonical(base.weight).detach())))"),
    # regressions of the fixes of issue 11
    Mutant("dropout_dropped_in_weight_space", "dropout silently skipped where the cost model picks weight space", "segadapt/adapters/base.py",
           "        if self.has_activation_form and self.dropout_active:\n            return True\n", ""),
    Mutant("salt_svd_stale_after_load", "SALT keeps the old base's SVD after load_state_dict", "segadapt/adapters/base.py",
           "                adapter.base_changed(self.base_layer)\n", "                pass\n"),
    Mutant("rslora_alpha_none", "rsLoRA with alpha=None gives s = sqrt(r)", "segadapt/adapters/config.py",
           "        if self.alpha is None:\n            return 1.0\n", "        if self.alpha is None:\n            return rank**0.5 if self.use_rslora else 1.0\n"),
    Mutant("cp_gaussian_std_per_factor", "CP gaussian init: std 1/r on every factor", "segadapt/adapters/cp.py",
           "        std = rank ** (-1.0 / (1 + spec.ndim))\n", "        std = 1.0 / rank\n"),
    Mutant("string_target_by_suffix", "a string target also matches by suffix", "segadapt/adapters/config.py",
           "        return re.fullmatch(pattern, name) is not None\n",
           "        return name.endswith(\".\" + pattern) or re.fullmatch(pattern, name) is not None\n"),
    Mutant("rank_bound_unchecked", "ranks above the bound accepted", "segadapt/adapters/base.py",
           "        if rank > bound:  # checked", "        if False:  # checked"),
    # the new capabilities
    Mutant("pissa_no_residual", "PiSSA: the base does not keep the residual (B0 A0 not subtracted)", "segadapt/adapters/lora.py",
           "adapter.lora_B @ adapter.lora_A - adapter.initial_B @ adapter.initial_A", "adapter.lora_B @ adapter.lora_A"),
    Mutant("pissa_sqrt_missing", "PiSSA: B0 = U sig, A0 = V^T (no square-root split)", "segadapt/adapters/base.py",
           "root = (sig[:rank] / scaling).sqrt()", "root = sig[:rank] / scaling"),
    Mutant("eva_least_variance", "EVA: the bottom instead of the top right-singular vectors", "segadapt/adapters/eva.py",
           "    return vh[:rank]\n", "    return vh[-rank:]\n"),
    Mutant("nested_no_rescale", "nested ranks: s stays alpha / r for a sampled b", "segadapt/adapters/base.py",
           "return self.sampled_rank, self.config.scaling(self.sampled_rank)", "return self.sampled_rank, self.scaling"),
    # the fast contraction orders of issue 15
    Mutant("tlora_chain_ring_not_closed", "TLoRA chain: the last core's ring index not matched to the first (its (b, i, a) rows built as (a, i, b))", "segadapt/adapters/tlora.py",
           "z = z @ core.permute(0, 1, 3, 2).reshape(ring * size * ring, size)", "z = z @ core.permute(3, 1, 0, 2).reshape(ring * size * ring, size)"),
    Mutant("tlora_chain_middle_in_out_swapped", "TLoRA chain: a middle core applied with its in and out modes swapped", "segadapt/adapters/tlora.py",
           "z = z.reshape(-1, ring * size) @ core.reshape(ring * size, size * ring)", "z = z.reshape(-1, ring * size) @ core.transpose(1, 2).reshape(ring * size, size * ring)"),
    Mutant("tlora_residual_split_unpaired", "TLoRA residual: the two open chains joined with their ring indices crossed", "segadapt/adapters/tlora.py",
           "left.permute(1, 2, 0).reshape(p, b * a)", "left.permute(1, 0, 2).reshape(p, b * a)"),
    Mutant("addmm_scaling_dropped", "W0 + alpha up @ down (one addmm): alpha ignored", "segadapt/adapters/base.py",
           "torch.addmm(w0.reshape(up.shape[0], -1), up, down, alpha=alpha)", "torch.addmm(w0.reshape(up.shape[0], -1), up, down)"),
    Mutant("lora_c_addmm_nested_rank_ignored", "LoRA-C one-addmm path: all r components used in a nested-rank forward", "segadapt/adapters/lora.py",
           "weight = self.plus_low_rank(w0, self.lora_B[:, :inner], self.lora_A[:inner], s)", "weight = self.plus_low_rank(w0, self.lora_B, self.lora_A, s)"),
    Mutant("cp_addmm_khatri_rao_reversed", "CP one-addmm path: the Khatri-Rao factors in reverse order", "segadapt/adapters/cp.py",
           "weight = None if self.initial is not None else self.plus_low_rank(w0, *self.low_rank_factors())",
           "weight = None if self.initial is not None else self.plus_low_rank(w0, self.low_rank_factors()[0], khatri_rao_t(self.factors[1:][::-1]))"),
    Mutant("auto_slower_order", "compute=auto keeps the slower measured order", "segadapt/adapters/calibration.py",
           "_decisions[key] = activation < weight", "_decisions[key] = activation > weight"),
    Mutant("auto_key_without_input_shape", "compute=auto: one measurement for every input shape of a layer", "segadapt/adapters/calibration.py",
           "adapter.branch_rank(), geometry, tuple(x.shape), x.dtype", "adapter.branch_rank(), geometry, x.dtype"),
    Mutant("truncate_trailing", "truncate keeps the last rows of A instead of the first", "segadapt/adapters/lora.py",
           "adapter.lora_A.detach()[:inner].clone()", "adapter.lora_A.detach()[-inner:].clone()"),
]


def copy_tree(destination: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("segadapt", "tests"):
        shutil.copytree(ROOT / name, destination / name, ignore=ignore)
    for name in ("pyproject.toml", "conftest.py"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, destination / name)


def run_tests(workdir: Path, timeout: float, test_files: list[str]) -> tuple[bool, str, float]:
    """(all passed, first failing test or '', seconds)."""
    env = {**os.environ, "PYTHONPATH": str(workdir), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", *test_files],
        cwd=workdir, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout,
    )
    seconds = time.perf_counter() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.MULTILINE)
    if proc.returncode == 0:
        return True, "", seconds
    return False, failed[0] if failed else f"pytest exit {proc.returncode}: {proc.stdout.strip().splitlines()[-1:]}", seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per test run")
    parser.add_argument("--tests", nargs="+", metavar="FILE", default=TEST_FILES,
                        help="test files to run (default: every tests/test_adapters_*.py)")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:36} {m.description}")
        return 0
    names = {m.name for m in MUTANTS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        print(f"error: unknown mutant(s) {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="segadapt_mutants_") as tmp:
        workdir = Path(tmp)
        copy_tree(workdir)
        clean, first, seconds = run_tests(workdir, args.timeout, args.tests)
        if not clean:
            print(f"error: the unmutated tests fail ({first}); fix them first", file=sys.stderr)
            return 2
        print(f"unmutated: {len(args.tests)} adapter test files pass ({seconds:.0f} s)\n")
        print("| mutant | bug | caught by | s |")
        print("|---|---|---|---|")
        for mutant in mutants:
            path = workdir / mutant.path
            source = path.read_text(encoding="utf-8")
            if source.count(mutant.old) != 1:
                print(f"| {mutant.name} | {mutant.description} | **does not apply** (snippet found {source.count(mutant.old)} times) | |")
                failures += 1
                continue
            path.write_text(source.replace(mutant.old, mutant.new), encoding="utf-8")
            try:
                passed, first, seconds = run_tests(workdir, args.timeout, args.tests)
            finally:
                path.write_text(source, encoding="utf-8")
            failures += passed
            caught = "**SURVIVED**" if passed else f"`{first}`"
            print(f"| {mutant.name} | {mutant.description} | {caught} | {seconds:.0f} |", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
