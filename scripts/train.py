"""Train one fold of one method (Hydra): ``python scripts/train.py fold=0``; sweeps with ``-m``.

With no arguments this is the built-in demo: it generates the phantom source (tbi) and target (sah)
datasets under data/ if absent, pretrains the base on the source if runs/base/... has no checkpoint,
adapts it to fold 0 of the target and prints the fold's Dice next to the unadapted base's.
Configs: configs/train.yaml (groups model/, adapter/, data/, trainer/).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from segadapt.cli import tolerate_ascii_console
from segadapt.training import train


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the fold's validation Dice (the objective for Hydra sweepers)."""
    tolerate_ascii_console()
    return train(OmegaConf.to_container(cfg, resolve=True))["val"]["dice"]


if __name__ == "__main__":
    main()
