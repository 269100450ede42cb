"""Train one fold of one method (Hydra): ``python scripts/train.py fold=0``; sweeps with ``-m``.

With no arguments this is the built-in demo: it generates the phantom source (tbi) and target (sah)
datasets under data/ if absent, pretrains the base on the source if runs/base/... has no checkpoint,
adapts it to fold 0 of the target and prints the fold's Dice next to the unadapted base's.
Configs: configs/train.yaml (groups model/, adapter/, data/, trainer/). Bad input (an override of the
wrong type, a finished run folder, a resume with other settings, a bad case, a run folder another training
holds) is one ``error:`` line, exit code 2, before anything is written (``SEGADAPT_DEBUG=1``: with the
traceback). The same command after a kill resumes the killed run from its last.ckpt; in a sweep it also
skips the runs that finished (:func:`segadapt.runs.run_folder_action`).

A local sweep (``-m``, Hydra's basic launcher) runs every job in this one process: the preprocessed cases,
the base weights and the base's validation scores are built once and shared by every method and fold
(:mod:`segadapt.training.sweep`); the end of the sweep prints the share of wall time spent in training steps.
torch is imported only once Hydra has parsed the command line, so ``--help`` answers at once.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

STARTED = time.perf_counter()  # setup time of the first run counts from here (imports included)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_INFORMATIONAL = {"-h", "--help", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc"}


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the fold's validation Dice (the objective for Hydra sweepers)."""
    from segadapt.cli import run_hydra_task
    from segadapt.training import train

    global STARTED
    started, STARTED = STARTED, None  # later jobs of a sweep count their setup from their own start
    return run_hydra_task(cfg, lambda job: train(job, started=started)["val"]["dice"])


if __name__ == "__main__":
    from segadapt.names import register_resolvers

    register_resolvers()  # the configs interpolate with it (data=dataset_json's name), `--cfg job --resolve` too
    if not _INFORMATIONAL & set(sys.argv[1:]):  # Hydra answers these itself, without running a job
        from functools import partial

        from segadapt.cli import check_hydra_request
        from segadapt.training.jobs import check_request

        sweep = bool({"-m", "--multirun"} & set(sys.argv[1:]))  # a sweep skips its finished runs
        check_hydra_request(CONFIGS, "train", partial(check_request, sweep=sweep))
    main()
