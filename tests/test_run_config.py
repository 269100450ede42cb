"""The typed run config: the request (TrainConfig, `auto` allowed where the plan decides) and the planned run
(RunConfig, concrete values only, what config.yaml stores); one train() prepares each dataset and builds one
SegDataModule."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segadapt.data import make_phantom_dataset
from segadapt.runs import CONFIG_FILE, read_run_config
from segadapt.training import RunConfig, SegDataModule, train
from segadapt.training import jobs
from segadapt.training.config import TrainConfig, type_error

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _compose(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True)


def test_auto_stands_only_where_the_plan_decides():
    request = TrainConfig.from_cfg(_compose("model=dynunet", "data.batch_size=auto", "data.preprocess.patch_size=auto"))
    assert request.model["kwargs"]["filters"] == "auto" and request.data["batch_size"] == "auto"
    assert request.trainer["max_steps"] == "auto" and request.selection.every_n_steps == "auto"  # the planned schedule
    assert TrainConfig.from_cfg(request.to_dict()) == request  # the plain mapping the plan's apply step reads
    for override, key in (("trainer.log_every_n_steps=auto", "trainer.log_every_n_steps"), ("eval_base=auto", "eval_base"),
                          ("optim.weight_decay=auto", "optim.weight_decay"), ("selection.inner_fraction=auto",
                                                                              "selection.inner_fraction")):
        with pytest.raises(ValueError, match=rf"^{key}='auto': expected"):
            TrainConfig.from_cfg(_compose(override))


def test_the_planned_run_refuses_auto():
    module = {"model": "dynunet", "model_kwargs": {"in_channels": 1, "filters": "auto"}, "adapter": "scratch"}
    with pytest.raises(ValueError, match=r"^module\.model_kwargs\.filters=auto: not planned"):
        RunConfig("run", {"experiment": "t"}, module, {"dataset_json": "d.json"}, {})
    run = RunConfig("run", {"experiment": "t"}, {**module, "model_kwargs": {"in_channels": 1}}, {"dataset_json": "d"}, {})
    assert run.run_dir == Path("run").resolve() and run.tuning == "scratch"
    assert run.record(threads=3)["run"] == {"experiment": "t", "tuning": "scratch", "seed": 0, "threads": 3,
                                           "run_dir": str(Path("run").resolve())}


@pytest.mark.parametrize("value, annotation, error", [
    (2, float, None), (".inf", float, None), ("x", float, "k='x': expected a number, got str"),
    (True, int, "k=True: expected an integer, got bool"), ([1, [2, 2]], list[list[int] | int], None),
    ([1, "a"], list[int], "k[1]='a': expected an integer, got str"), ("32-true", int | str, None),
    ({"a": "b"}, dict[str, int], "k.a='b': expected an integer, got str"), (None, int, None),
])
def test_type_error(value, annotation, error):
    assert type_error("k", value, annotation) == error


def test_one_train_prepares_each_dataset_once_and_builds_one_datamodule(tmp_path, monkeypatch):
    """The plan, the planned run and the fit share one prepared dataset.json and one SegDataModule (the input
    channels come from dataset.json and the preprocessing, not from a second data module)."""
    dataset = make_phantom_dataset(tmp_path / "data", "sah", 4, 0, (24, 24, 12), (9.0, 9.0, 13.0))
    prepared, built = [], []
    prepare = jobs.prepare_dataset
    monkeypatch.setattr(jobs, "prepare_dataset", lambda data: prepared.append(data["dataset_json"]) or prepare(data))
    init = SegDataModule.__init__

    @functools.wraps(init)  # Lightning's save_hyperparameters reads __init__'s signature (followed to the original)
    def counted_init(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    # (not __new__: monkeypatch would restore the inherited object.__new__ as the class's own attribute, which
    # then refuses the arguments of every later construction)
    monkeypatch.setattr(SegDataModule, "__init__", counted_init)
    run_dir = tmp_path / "run"
    train(_compose("data=dataset_json", f"data.dataset_json={dataset}", "data.name=tiny", "adapter=scratch",
                   f"base_checkpoint={tmp_path}/none/model.safetensors", f"run_dir={run_dir}", f"paths.runs={tmp_path}",
                   "model=unet3d", "model.kwargs.channels=[4,8]", "model.kwargs.strides=[2]",
                   "data.preprocess.patch_size=[16,16,8]", "data.preprocess.samples_per_volume=1", "data.n_folds=2",
                   "data.batch_size=1", "trainer.max_steps=1", "eval_base=false", "selection.inner_fraction=0",
                   "trainer.enable_progress_bar=false", "trainer.threads=1"))
    assert prepared == [str(dataset)] and len(built) == 1
    assert read_run_config(run_dir)["module"]["model_kwargs"]["in_channels"] == 1 and (run_dir / CONFIG_FILE).is_file()
