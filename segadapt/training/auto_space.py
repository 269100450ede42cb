"""The search space of ``segadapt auto`` (``configs/auto.yaml``): read, narrowed, checked, and sampled by a trial.

Every choice is a plain option of an ordinary run (``configs/train.yaml`` with ``adapter=<method>``):

* ``method``: an adapter config ``configs/adapter/<name>.yaml`` (the init variants, e.g. ``conv_lora_pissa``,
  are configs of their own), or the baselines ``full`` / ``decoder``;
* ``rank`` (adapter methods): ``adapter.spec.rank``, with ``alpha = rank`` (scale 1, as the configs have it)
  and SALT's ``lora_rank = rank``; ``cap_rank`` on, so a layer too small for it takes its own largest rank;
* ``rank_pattern`` (adapter methods): a name of ``auto.rank_patterns``, ``{preset: factor}``: the layers of each
  preset get rank x factor (``adapter.spec.rank_pattern``, after the config's own entries, which win);
* ``placement`` (adapter methods): ``adapter.preset``, and ``train``: the layers of another preset, or the
  classification ``head``, trained in full beside the adapter (``adapter.spec.train_modules``, excluded from
  the adapter);
* ``norms`` (adapter methods): ``adapter.spec.norms``, the affine parameters of the normalisation layers trained
  beside the adapter; the method ``norms`` trains them alone. Both leave the space when the network has no
  normalisation layer with affine parameters (:func:`fit_norms`);
* ``lr_factor``: ``adapter.lr`` = the method config's lr x factor (log-uniform).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna

BASELINE_METHODS = ("full", "decoder", "norms")  # no rank or placement; they train the base's own modules
NOT_ADAPTATIONS = ("none", "scratch")  # configs/adapter entries that adapt nothing of the base
KEYS = ("methods", "ranks", "rank_patterns", "placements", "norms", "lr_factor", "inner_fraction", "rule", "seed",
        "startup_trials", "pruner", "ensemble", "ensemble_rule")
RULES = ("one_se", "best")
PRUNERS = ("median", "hyperband", "none")
ENSEMBLE_RULES = ("one_se", "always", "never")  # segadapt.training.auto_ensemble.prefer_ensemble


def load_space(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``configs/auto.yaml`` (`path`) with ``key=value`` `overrides` (OmegaConf dot-list syntax) merged over it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search space not found: {path} (give --space FILE)")
    try:
        space = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    except (OmegaConfBaseException, ValueError) as error:
        raise ValueError(f"search space {path}: {' '.join(str(error).split())}") from None
    space = OmegaConf.to_container(space, resolve=True)
    if not isinstance(space, dict):
        raise ValueError(f"search space {path}: expected 'key: value' lines")
    return space


def check_space(space: Mapping[str, Any], adapter_dir: Path) -> None:
    """Refuse (ValueError naming the key) a search space no search can run: unknown keys or methods, empty
    choices, ranges or rules out of bounds."""
    unknown = sorted(set(space) - set(KEYS))
    if unknown:
        raise ValueError(f"auto.{unknown[0]}: unknown key of the search space (keys: {', '.join(KEYS)})")
    missing = [k for k in KEYS if k not in space]
    if missing:
        raise ValueError(f"auto.{missing[0]}: missing from the search space")
    methods = space["methods"]
    if not isinstance(methods, list) or not methods:
        raise ValueError(f"auto.methods must be a non-empty list of configs/adapter names, got {methods!r}")
    known = sorted(p.stem for p in adapter_dir.glob("*.yaml"))
    for method in methods:
        if method in NOT_ADAPTATIONS:
            raise ValueError(f"auto.methods: {method!r} does not adapt the base; choose among {', '.join(known)}")
        if method not in known:
            raise ValueError(f"auto.methods: no adapter config {method!r} in {adapter_dir} (known: {', '.join(known)})")
    ranks = space["ranks"]
    if not isinstance(ranks, list) or not ranks or not all(isinstance(r, int) and r >= 1 for r in ranks):
        raise ValueError(f"auto.ranks must be a non-empty list of integers >= 1, got {ranks!r}")
    patterns = space["rank_patterns"]
    if not isinstance(patterns, dict) or not patterns or not all(
            isinstance(p, dict) and all(isinstance(f, (int, float)) and f > 0 for f in p.values()) for p in patterns.values()):
        raise ValueError(f"auto.rank_patterns must map names to {{PRESET: factor > 0, ...}} ({{}}: uniform), got {patterns!r}")
    placements = space["placements"]
    if not isinstance(placements, dict) or not placements:
        raise ValueError(f"auto.placements must map names to {{preset: ..., train: ...}}, got {placements!r}")
    for name, placement in placements.items():
        if not isinstance(placement, dict) or not isinstance(placement.get("preset"), str) \
                or set(placement) - {"preset", "train"}:
            raise ValueError(f"auto.placements.{name} must be {{preset: NAME}} or {{preset: NAME, train: NAME}}, "
                             f"got {placement!r}")
    norms = space["norms"]
    if not isinstance(norms, list) or not norms or not all(isinstance(n, bool) for n in norms):
        raise ValueError(f"auto.norms must be a non-empty list of true / false, got {norms!r}")
    factor = space["lr_factor"]
    if not (isinstance(factor, list) and len(factor) == 2 and all(isinstance(f, (int, float)) for f in factor)
            and 0 < factor[0] <= factor[1] and math.isfinite(factor[1])):
        raise ValueError(f"auto.lr_factor must be [low, high] with 0 < low <= high, got {factor!r}")
    if not isinstance(space["inner_fraction"], (int, float)) or not 0 < space["inner_fraction"] < 1:
        raise ValueError(f"auto.inner_fraction must be in (0, 1), got {space['inner_fraction']!r}")
    for key, allowed in (("rule", RULES), ("pruner", PRUNERS), ("ensemble_rule", ENSEMBLE_RULES)):
        if space[key] not in allowed:
            raise ValueError(f"auto.{key} must be one of {', '.join(allowed)}, got {space[key]!r}")
    for key in ("seed", "startup_trials", "ensemble"):
        if not isinstance(space[key], int) or space[key] < 0:
            raise ValueError(f"auto.{key} must be an integer >= 0, got {space[key]!r}")


def trial_sampler(space: Mapping[str, Any], fold: int, number: int) -> optuna.samplers.TPESampler:
    """The TPE sampler that draws trial `number` of `fold`, seeded by (``auto.seed``, fold, number). Each worker
    process of a search holds its own sampler: seeded once per process, every worker drew the same random
    start-up trials (a search of 2 workers ran each configuration twice). Seeded per trial, a trial's draw does
    not depend on which worker asked for it. ``constant_liar``: running trials count as poor ones, so that
    parallel workers do not converge on one point (Optuna's advice for parallel TPE)."""
    seed = int(np.random.SeedSequence([int(space["seed"]), fold, number]).generate_state(1)[0])
    with warnings.catch_warnings():  # constant_liar is marked experimental (ExperimentalWarning at every sampler)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(space["startup_trials"]), constant_liar=True)


def draw(trial: optuna.Trial, space: Mapping[str, Any], fold: int) -> dict[str, Any]:
    """The choices of `trial` (:func:`suggest`), drawn by its own :func:`trial_sampler`."""
    trial.study.sampler = trial_sampler(space, fold, trial.number)
    return suggest(trial, space)


def suggest(trial: Any, space: Mapping[str, Any]) -> dict[str, Any]:
    """The choices of an Optuna `trial` (define-by-run: rank and placement only for the adapter methods)."""
    choice = {"method": trial.suggest_categorical("method", list(space["methods"]))}
    if choice["method"] not in BASELINE_METHODS:
        choice["rank"] = trial.suggest_categorical("rank", list(space["ranks"]))
        choice["rank_pattern"] = trial.suggest_categorical("rank_pattern", list(space["rank_patterns"]))
        choice["placement"] = trial.suggest_categorical("placement", list(space["placements"]))
        norms = sorted(set(space["norms"]))
        choice["norms"] = trial.suggest_categorical("norms", norms) if len(norms) > 1 else norms[0]
    low, high = space["lr_factor"]
    choice["lr_factor"] = trial.suggest_float("lr_factor", float(low), float(high), log=True) if low < high else float(low)
    return choice


def apply_choice(cfg: Mapping[str, Any], choice: Mapping[str, Any], space: Mapping[str, Any],
                 module_names: Callable[[str], list[str]]) -> dict[str, Any]:
    """A copy of the resolved run config `cfg` (composed with ``adapter=<choice['method']>``) with the choice's
    rank, placement and learning rate. `module_names(name)`: the layers of a preset, or of ``'head'``."""
    cfg = copy.deepcopy(dict(cfg))
    adapter = cfg["adapter"]
    adapter["lr"] = float(adapter["lr"]) * float(choice["lr_factor"])
    if "rank" in choice and isinstance(adapter["spec"], dict):
        spec = adapter["spec"]
        spec["rank"] = int(choice["rank"])
        if "alpha" in spec:
            spec["alpha"] = int(choice["rank"])
        if "lora_rank" in spec:
            spec["lora_rank"] = int(choice["rank"])
        spec["cap_rank"] = True  # a rank a layer cannot take is capped there (metrics.json: capped_ranks), not a failure
        scaled = {re.escape(name): max(1, round(int(choice["rank"]) * float(factor)))
                  for preset, factor in space["rank_patterns"][choice.get("rank_pattern", "uniform")].items()
                  for name in module_names(preset)} if choice.get("rank_pattern") else {}
        spec["rank_pattern"] = {**(spec.get("rank_pattern") or {}), **{k: v for k, v in scaled.items()
                                                                       if k not in (spec.get("rank_pattern") or {})}}
    if "placement" in choice and isinstance(adapter["spec"], dict):
        placement = space["placements"][choice["placement"]]
        adapter["preset"] = placement["preset"]
        if placement.get("train"):
            names = module_names(placement["train"])
            adapter["spec"]["train_modules"] = names
            adapter["spec"]["exclude"] = "|".join(re.escape(n) + r"(?:\..*)?" for n in names)  # and what is inside
    if choice.get("norms") and isinstance(adapter["spec"], dict):
        adapter["spec"]["norms"] = True
    return cfg


def check_placements(space: Mapping[str, Any], presets: Sequence[str], model: str) -> None:
    """Refuse a placement whose preset (or trained part) the network does not have (`presets`: its presets)."""
    for name, pattern in space["rank_patterns"].items():
        unknown = [p for p in pattern if p not in presets]
        if unknown:
            raise ValueError(f"auto.rank_patterns.{name}: {model} has no preset {unknown[0]!r} (presets: {', '.join(presets)})")
    for name, placement in space["placements"].items():
        for key in ("preset", "train"):
            value = placement.get(key)
            if value is not None and value not in presets and not (key == "train" and value == "head"):
                raise ValueError(f"auto.placements.{name}.{key}: {model} has no preset {value!r} "
                                 f"(presets: {', '.join(presets)}{'; or head' if key == 'train' else ''})")


def fit_norms(space: Mapping[str, Any], affine_norms: bool, model: str) -> tuple[dict[str, Any], str]:
    """The space for a network with (`affine_norms`) or without normalisation layers with affine parameters, and
    a note of what was left out: without them, norm tuning (the method ``norms``, ``norms: true``) would only be
    refused trial by trial, so it leaves the space; ValueError when nothing else is left of a dimension."""
    space = copy.deepcopy(dict(space))
    if affine_norms or ("norms" not in space["methods"] and space["norms"] == [False]):
        return space, ""
    reason = f"{model} has no normalisation layer with affine parameters (e.g. InstanceNorm without affine)"
    methods = [m for m in space["methods"] if m != "norms"]
    if not methods:
        raise ValueError(f"auto.methods=[norms]: {reason}; choose other methods")
    if False not in space["norms"] and any(m not in BASELINE_METHODS for m in methods):
        raise ValueError(f"auto.norms=[true]: {reason}; give auto.norms=[false]")
    space["methods"], space["norms"] = methods, [False]
    return space, f"; norm tuning left out: {reason}"


def describe_space(space: Mapping[str, Any]) -> str:
    """One line of the search space, as a search prints it."""
    low, high = space["lr_factor"]
    return "; ".join([f"methods {', '.join(space['methods'])}", f"ranks {', '.join(map(str, space['ranks']))}",
                      f"rank patterns {', '.join(space['rank_patterns'])}", f"placements {', '.join(space['placements'])}",
                      f"norms {'/'.join(str(n).lower() for n in space['norms'])}", f"lr x{low:g}..x{high:g}"])
