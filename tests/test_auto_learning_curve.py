"""``segadapt auto`` at a point of a learning curve (``data.max_train_cases=N``): the search sees exactly the
patients that a fixed run of the same fold loads (its N training cases and its model selection's inner cases),
read from the data module such a run builds; the trials then train on all of the search's patients."""

from __future__ import annotations

from pathlib import Path

import pytest
from run_fixtures import tiny_phantom

from segadapt.training import SegDataModule
from segadapt.training.auto import Search
from segadapt.training.config import datamodule_args

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _case_ids(dataset) -> set[str]:
    return {d["case_id"] for d in dataset.data}


def test_a_learning_curve_point_searches_only_the_patients_a_fixed_run_sees(tmp_path):
    overrides = [*tiny_phantom("trainer.threads=1", "model.kwargs.channels=[4,8]", "model.kwargs.strides=[2]"),
                 f"paths.data={tmp_path}/data", f"paths.runs={tmp_path}/runs", "data.max_train_cases=1"]
    search = Search(CONFIGS, overrides, ["methods=[lora_c]"], trials=1)
    for fold in range(int(search.cfg["data"]["n_folds"])):
        cases = search.fold_cases(fold)
        fixed = SegDataModule(**datamodule_args(search.cfg, search.cfg["data"], search.dataset, fold))
        fixed.setup("fit")
        seen = _case_ids(fixed.train_set) | _case_ids(fixed.inner_set)
        assert len(_case_ids(fixed.train_set)) == 1 and _case_ids(fixed.inner_set)
        assert set(cases["trial_train"]) | set(cases["inner"]) == seen
        assert set(cases["trial_train"]).isdisjoint(cases["inner"]) and cases["trial_train"] and cases["inner"]
        assert seen.isdisjoint(cases["outer_val"]) and sorted(cases["outer_val"]) == sorted(_case_ids(fixed.val_set))
        trial = search.trial_config(fold, {"method": "lora_c", "rank": 2, "placement": "all_conv", "lr_factor": 1.0},
                                    tmp_path / "trial")
        assert trial["data"]["max_train_cases"] is None  # the trials train on every patient of the search's dataset
