"""Pretrain the base network on the source domain (Hydra): ``python scripts/pretrain.py``.

Trains the model of configs/train.yaml (``model=...``) from random initialisation on ``source``
(default: the tbi phantom, generated if absent) and writes ``${pretrain.run_dir}/model.safetensors``, the
base checkpoint that ``scripts/train.py`` loads. Another source: ``data@source=dataset_json
source.dataset_json=/path/dataset.json source.name=mysource``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from segadapt.cli import tolerate_ascii_console
from segadapt.training import pretrain


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain")
def main(cfg: DictConfig) -> float:
    tolerate_ascii_console()
    return pretrain(OmegaConf.to_container(cfg, resolve=True))["val"]["dice"]


if __name__ == "__main__":
    main()
