"""The dataset plan: nnU-Net v2's self-configuration rules, and the run settings they decide.

::

    fingerprint.fingerprint(dataset_json) -> dict           # fingerprint.py: every training case read once
    make_plan(fp, memory_gb=8) -> Plan                      # planner.py: spacing, patch, network, batch, intensity
    load_or_make_plan(dataset_json, cache_dir) -> Plan      # the fingerprint cached by the dataset's content
    pooling_topology, fit_patch                             # topology.py: nnU-Net's pooling and patch search
    fit_step_budget(plan, ...) -> Plan                      # budget.py: shrink to the machine's time per step
    plan_schedule(...) -> Schedule                          # schedule.py: steps, warm-up, selection, patience
    apply_plan(cfg, plan) / run_plan(cfg, ...)              # apply.py: a run config's `auto` values
    segadapt plan DATASET_JSON                              # cli.py

(apply.py and budget.py import torch and Lightning: import them by module, not from here.)
"""

from .planner import Plan, format_plan, load_or_make_plan, make_plan

__all__ = ["Plan", "format_plan", "load_or_make_plan", "make_plan"]
