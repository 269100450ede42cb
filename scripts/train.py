"""Train one fold of one method (Hydra): ``python scripts/train.py fold=0``; sweeps with ``-m``.

With no arguments this is the built-in demo: it generates the phantom source (tbi) and target (sah)
datasets under data/ if absent, pretrains the base on the source if runs/base/... has no checkpoint,
adapts it to fold 0 of the target and prints the fold's Dice next to the unadapted base's.
Configs: configs/train.yaml (groups model/, adapter/, data/, trainer/). Bad input (an override of the
wrong type, a finished run folder, a resume with other settings, a bad case) is one ``error:`` line,
exit code 2, before anything is written (``SEGADAPT_DEBUG=1``: with the traceback).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from segadapt.cli import check_hydra_request, run_hydra_task
from segadapt.training import train
from segadapt.training.run import check_request

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the fold's validation Dice (the objective for Hydra sweepers)."""
    return run_hydra_task(cfg, lambda job: train(job)["val"]["dice"])


if __name__ == "__main__":
    check_hydra_request(CONFIGS, "train", check_request)
    main()
