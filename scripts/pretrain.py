"""Pretrain the base network on the source domain (Hydra): ``python scripts/pretrain.py``.

Trains the model of configs/train.yaml (``model=...``) from random initialisation on ``source``
(default: the tbi phantom, generated if absent) and writes ``${pretrain.run_dir}/model.safetensors``, the
base checkpoint that ``scripts/train.py`` loads. Another source: ``data@source=dataset_json
source.dataset_json=/path/dataset.json source.name=mysource``. An existing base is kept unless
``overwrite=true``; bad input is one ``error:`` line, exit code 2.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import hydra
from omegaconf import DictConfig

from segadapt.cli import check_hydra_request, run_hydra_task
from segadapt.training import pretrain
from segadapt.training.jobs import check_request

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain")
def main(cfg: DictConfig) -> float:
    return run_hydra_task(cfg, lambda job: pretrain(job)["val"]["dice"])


if __name__ == "__main__":
    check_hydra_request(CONFIGS, "pretrain", partial(check_request, kind="pretrain"))
    main()
