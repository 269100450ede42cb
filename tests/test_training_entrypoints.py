"""End-to-end runs of every entry point on tiny phantoms: scripts/train.py (a two-fold Hydra sweep that also
generates the data and pretrains the base), the run folder read back, resume after an interruption, the
Lightning CLI, and the report."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from run_fixtures import tiny_phantom
from safetensors import safe_open

from segadapt.cli import run as segadapt_main
from segadapt.runs import ADAPTER_FILE, CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, read_metrics, read_run_config
from segadapt.training import (
    RunConfig,
    SegDataModule,
    TrainStats,
    fit_run,
    load_run,
    summarize,
    train,
    write_report,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_phantom("trainer.log_every_n_steps=1")
TINY_UNET = ["model.kwargs.channels=[4,8]", "model.kwargs.strides=[2]"]
TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
           "num_sanity_val_steps": 0, "log_every_n_steps": 1}


def _nan(row: dict) -> dict:
    """metrics.json writes NaN as null; back to NaN."""
    return {k: (math.nan if v is None else v) for k, v in row.items()}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`python scripts/train.py -m fold=0,1` on a fresh folder: phantoms, base pretraining, two adapted folds.

    Run with an ASCII console (``LC_ALL=C`` without Python's UTF-8 mode), where Lightning's rich progress bar
    cannot print its symbols: the script must still finish."""
    root = tmp_path_factory.mktemp("sweep")
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "-m", "fold=0,1", "adapter=cp_lora", f"paths.data={root}/data",
           f"paths.runs={root}/runs", *[a for a in TINY if "enable_progress_bar" not in a], *TINY_UNET]
    ascii_console = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}
    done = subprocess.run(cmd, cwd=root, env=ascii_console, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unadapted base" in done.stdout and "phantom_sah / cp_lora / fold 1" in done.stdout
    return root


def test_sweep_writes_data_base_and_one_folder_per_fold(sweep):
    assert (sweep / "data/phantom_sah/dataset.json").is_file() and (sweep / "data/phantom_tbi/dataset.json").is_file()
    base = sweep / "runs/base/phantom_tbi_multiview_unet"
    assert (base / WEIGHTS_FILE).is_file() and read_metrics(base)["run"]["tuning"] == "scratch"
    for fold in (0, 1):
        run = sweep / f"runs/phantom_sah/multiview_unet/cp_lora/fold{fold}"
        for name in (CONFIG_FILE, METRICS_FILE, ADAPTER_FILE, CHECKPOINT_FILE, "logs/metrics.csv", ".hydra/config.yaml"):
            assert (run / name).is_file(), name
        log_text = (run / "train.log").read_text(encoding="utf-8")  # Hydra's job log holds the run summary too
        assert f"phantom_sah / cp_lora / fold {fold}:" in log_text and "unadapted base :" in log_text
        config = read_run_config(run)
        assert config["run"]["fold"] == fold and config["run"]["method"] == "cp_lora"
        module = config["module"]
        assert Path(module["base_checkpoint"]) == (base / WEIGHTS_FILE).resolve()
        assert module["model_kwargs"]["in_channels"] == 3 and module["adapter"]["method"] == "cp_lora"
        preprocess = config["datamodule"]["preprocess"]
        assert preprocess["slice_size"] == [32, 32] and preprocess["windows"][0] == [40, 80]
        assert config["datamodule"]["fold"] == fold and Path(config["datamodule"]["dataset_json"]).is_absolute()
        metrics = read_metrics(run)
        assert metrics["global_step"] == 2 and metrics["cost"]["train_steps"] == 2
        assert metrics["cost"]["trainable_params"] > 0 and metrics["cost"]["peak_mem_mb"] > 0
        assert len(metrics["cases"]) == 2 and metrics["base_val"] is not None
        selection = metrics["selection"]  # 2 steps, inner check every 50: the last step is the one candidate
        assert [c["step"] for c in selection["curve"]] == [2] and selection["selected_step"] == 2
        assert len(selection["inner_cases"]) == 1 and not set(selection["inner_cases"]) & {c["case_id"] for c in metrics["cases"]}
        assert metrics["val_last"] == metrics["val"] and metrics["base_inner_dice"] is not None
        cases = [_nan(c) for c in metrics["cases"]]
        edges = metrics["volume_bins_ml"][:-1] + [math.inf]  # JSON holds the last edge, inf, as null
        assert _nan(metrics["val"]) == pytest.approx(summarize(cases, edges), nan_ok=True)
        with safe_open(str(run / ADAPTER_FILE), "pt") as f:  # the trained tensors only, not the base
            assert sum(np.prod(f.get_slice(k).get_shape())
                       for k in f.keys()) == metrics["cost"]["trainable_params"]
    validated = [{c["case_id"] for c in read_metrics(sweep / f"runs/phantom_sah/multiview_unet/cp_lora/fold{k}")["cases"]} for k in (0, 1)]
    split = json.loads((sweep / "data/phantom_sah/splits_3fold_seed0.json").read_text(encoding="utf-8"))
    assert validated == [set(fold["val"]) for fold in split[:2]] and not validated[0] & validated[1]


def test_adapter_file_and_base_reproduce_the_validation_metrics(sweep):
    run = sweep / "runs/phantom_sah/multiview_unet/cp_lora/fold0"
    module, config = load_run(run)
    trainer = pl.Trainer(logger=False, **TRAINER)
    trainer.validate(module, datamodule=SegDataModule(**config["datamodule"]), verbose=False)
    stored = read_metrics(run)["cases"]
    assert [r["case_id"] for r in module.case_rows] == [r["case_id"] for r in stored]
    for mine, theirs in zip(module.case_rows, stored):
        assert mine["dice"] == pytest.approx(theirs["dice"], abs=1e-6)
        assert mine["pred_ml"] == pytest.approx(theirs["pred_ml"], abs=1e-9)


def test_report_aggregates_folds_and_methods(sweep, tmp_path):
    experiment = sweep / "runs/phantom_sah"
    paths = write_report(experiment, tmp_path)
    for key in ("markdown", "csv", "dice_by_method", "dice_vs_volume"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    assert paths["dice_by_method"].read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(paths["csv"].open(encoding="utf-8")))
    assert [r["method"] for r in rows] == ["none", "cp_lora"]  # the unadapted base (from base_cases) is always a row
    dice = [c["dice"] for k in (0, 1) for c in read_metrics(experiment / f"multiview_unet/cp_lora/fold{k}")["cases"]]
    assert float(rows[1]["dice_mean"]) == pytest.approx(np.mean(dice))
    assert float(rows[1]["dice_sd"]) == pytest.approx(np.std(dice, ddof=1))
    assert int(rows[1]["n_cases"]) == 4 and rows[1]["folds"] == "2"
    base = [c["dice"] for k in (0, 1) for c in read_metrics(experiment / f"multiview_unet/cp_lora/fold{k}")["base_cases"]]
    assert float(rows[0]["dice_mean"]) == pytest.approx(np.mean(base)) and rows[0]["p_vs_none"] == ""
    text = paths["markdown"].read_text(encoding="utf-8")
    assert re.search(r"\| cp_lora +\| 4 +\|", text)  # method, n (tabulate pads cells)
    assert text.startswith("# Cross-validation report: phantom_sah (haemorrhage)")  # the dataset's label name
    assert rows[1]["settings_differ"] == ""  # real fold configs differ only in their per-fold keys
    segadapt_main(["report", str(experiment), "--out", str(tmp_path / "cli")])  # the same through the CLI
    assert (tmp_path / "cli" / "report.csv").read_text(encoding="utf-8") == paths["csv"].read_text(encoding="utf-8")
    # a leftover fold of another split validates a case twice: refused, naming the method and the case
    mixed = tmp_path / "mixed"
    shutil.copytree(experiment, mixed)
    leftover = read_metrics(mixed / "multiview_unet/cp_lora/fold0")
    leftover["run"]["fold"] = 4
    (mixed / "multiview_unet/cp_lora/fold4").mkdir()
    (mixed / "multiview_unet/cp_lora/fold4" / METRICS_FILE).write_text(json.dumps(leftover), encoding="utf-8")
    with pytest.raises(ValueError, match=r"method 'cp_lora': case '.+' is validated in fold 0 and fold 4"):
        write_report(mixed, tmp_path / "mixed_report")


def _run_args(sweep: Path, **module):
    config = read_run_config(sweep / "runs/phantom_sah/multiview_unet/cp_lora/fold0")
    return {**config["module"], **module}, config["datamodule"]


class _Crash(pl.Callback):
    """Fails at a given global step, as a killed job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_resume_after_interruption_continues_from_the_saved_step(sweep, tmp_path):
    module_kwargs, data_kwargs = _run_args(sweep)
    run = tmp_path / "run"
    args = dict(identity={"experiment": "t", "method": "cp_lora", "fold": 0}, module=module_kwargs,
                datamodule=data_kwargs, eval_base=False, checkpoint_every=2)
    run.mkdir()
    (run / METRICS_FILE).write_text("{}", encoding="utf-8")  # results of an earlier run in the same folder
    (run / ADAPTER_FILE).write_bytes(b"stale")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_run(RunConfig(run, trainer={**TRAINER, "max_steps": 5}, overwrite=True, **args), callbacks=[_Crash(3)])
    assert (run / CHECKPOINT_FILE).is_file()
    assert not (run / METRICS_FILE).exists() and not (run / ADAPTER_FILE).exists()  # a crash leaves no stale results
    result = fit_run(RunConfig(run, trainer={**TRAINER, "max_steps": 5}, **args), ckpt_path="last")
    assert result["cost"]["resumed_from_step"] == 2
    assert result["global_step"] == 5
    assert result["cost"]["train_steps"] == 2 + 3  # 2 steps saved in last.ckpt before the crash, then steps 2-4


def _cli_config(sweep: Path, path: Path, run_dir: Path, **trainer) -> Path:
    """The settings of the sweep's fold-0 run (its config.yaml) as a `segadapt fit` config that writes `run_dir`."""
    config = read_run_config(sweep / "runs/phantom_sah/multiview_unet/cp_lora/fold0")
    path.write_text(yaml.safe_dump({
        "seed_everything": config["run"]["seed"], "model": config["module"], "data": config["datamodule"],
        "trainer": {**config["trainer"], "default_root_dir": str(run_dir), **trainer},
    }), encoding="utf-8")
    return path


def test_lightning_cli_fit_writes_the_run_folder_of_scripts_train(sweep, tmp_path, capsys):
    """`segadapt fit` on the settings of a scripts/train.py run writes the same run folder with the same numbers
    (cases, model selection, Dice of the selected and the last network); load_run rebuilds the network the CLI
    trained; `segadapt validate --ckpt_path last` scores last.ckpt, the last step's network: metrics.json val_last."""
    source, run = sweep / "runs/phantom_sah/multiview_unet/cp_lora/fold0", tmp_path / "cli"
    config = _cli_config(sweep, tmp_path / "cli.yaml", run)
    fitted = segadapt_main(["fit", "--config", str(config)])
    assert fitted.trainer.global_step == 2
    for name in (CONFIG_FILE, METRICS_FILE, ADAPTER_FILE, CHECKPOINT_FILE, "fingerprint.json", "logs/metrics.csv"):
        assert (run / name).is_file(), name
    ours, theirs = read_metrics(run), read_metrics(source)
    for key in ("val", "val_last", "base_val"):
        assert _nan(ours[key]) == pytest.approx(_nan(theirs[key]), abs=1e-6, nan_ok=True), key
    assert [c["case_id"] for c in ours["cases"]] == [c["case_id"] for c in theirs["cases"]]
    curves = [[(c["step"], c["dice"]) for c in m["selection"]["curve"]] for m in (ours, theirs)]
    assert [s for s, _ in curves[0]] == [s for s, _ in curves[1]]
    assert [d for _, d in curves[0]] == pytest.approx([d for _, d in curves[1]], abs=1e-6)
    module_args, asked = read_run_config(run)["module"], read_run_config(source)["module"]
    assert {k: module_args[k] for k in asked} == asked  # and the defaults scripts/train.py leaves out
    module, _ = load_run(run)
    image = torch.rand(1, 3, 32, 32, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(module.predict_probabilities(image), fitted.model.eval().predict_probabilities(image))
    capsys.readouterr()
    validated = segadapt_main(["validate", "--config", str(config), "--ckpt_path", "last"])
    assert float(validated.trainer.callback_metrics["val/dice"]) == pytest.approx(ours["val_last"]["dice"], abs=1e-6)
    assert f"segadapt validate: scored {run / CHECKPOINT_FILE}: the network at step 2\n" in capsys.readouterr().out


def test_lightning_cli_resumes_a_killed_fit(sweep, tmp_path):
    """A `segadapt fit` killed at step 3 (last.ckpt of step 2 in the run folder) resumes with --ckpt_path last and
    the same settings: it trains steps 2 and 3 only and finishes the run folder."""
    run = tmp_path / "cli"
    config = _cli_config(sweep, tmp_path / "cli.yaml", run, max_steps=4)
    crashing = yaml.safe_load(config.read_text(encoding="utf-8"))
    crashing["trainer"]["callbacks"] = [{"class_path": f"{__name__}._Crash", "init_args": {"step": 3}}]
    (tmp_path / "crash.yaml").write_text(yaml.safe_dump(crashing), encoding="utf-8")
    with pytest.raises(RuntimeError, match="simulated crash"):
        segadapt_main(["fit", "--config", str(tmp_path / "crash.yaml"), "--checkpoint_every", "2"])
    assert (run / CHECKPOINT_FILE).is_file() and not (run / METRICS_FILE).exists()
    resumed = segadapt_main(["fit", "--config", str(config), "--ckpt_path", "last"])
    stats = next(c.stats for c in resumed.trainer.callbacks if isinstance(c, TrainStats))
    assert stats["resumed_from_step"] == 2 and resumed.trainer.global_step == 4
    metrics = read_metrics(run)
    assert metrics["global_step"] == 4 and metrics["cost"]["train_steps"] == 4


def test_none_baseline_validates_without_training(sweep, tmp_path):
    module_kwargs, data_kwargs = _run_args(sweep, adapter="none")
    result = fit_run(RunConfig(tmp_path / "none", {"experiment": "t", "method": "none", "fold": 0}, module_kwargs,
                               data_kwargs, {**TRAINER, "max_steps": 2}))
    assert result["global_step"] == 0 and result["cost"]["trainable_params"] == 0 and "train_time_s" not in result["cost"]
    assert not (tmp_path / "none" / CHECKPOINT_FILE).exists()
    base = read_metrics(sweep / "runs/phantom_sah/multiview_unet/cp_lora/fold0")["base_cases"]
    assert [r["dice"] for r in result["cases"]] == pytest.approx([r["dice"] for r in base])
    text = (tmp_path / "none" / METRICS_FILE).read_text(encoding="utf-8")
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json is not JSON"))


@pytest.mark.parametrize("model, adapter, overrides", [
    ("unet3d", "cp_lora", TINY_UNET),
    ("dynunet", "conv_lora", ["model.kwargs.filters=[4,8,16]", "model.kwargs.kernel_size=[3,3,3]", "model.kwargs.strides=[1,2,2]"]),
    ("vit_seg", "lora", ["model.kwargs.img_size=32", "+model.kwargs.encoder_kwargs={depth:1}"]),
])
def test_other_models_run_from_the_same_configs(sweep, tmp_path, model, adapter, overrides):
    """3D UNet and DynUNet on patches with sliding-window validation, a 2D ViT on slices with axial slice
    inference: each pretrains its own base, adapts, and writes a run folder (Hydra compose API, in process)."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"adapter={adapter}", f"paths.data={sweep}/data",
                                          f"paths.runs={tmp_path}", *TINY, *overrides, "trainer.max_steps=1",
                                          "pretrain.max_steps=1"])
    result = train(OmegaConf.to_container(cfg, resolve=True))
    run = tmp_path / "phantom_sah" / model / adapter / "fold0"
    assert (tmp_path / "base" / f"phantom_tbi_{model}" / WEIGHTS_FILE).is_file()
    assert (run / ADAPTER_FILE).is_file() and result["global_step"] == 1 and len(result["cases"]) == 2
    module, _ = load_run(run)
    expected = {"unet3d": [32, 32, 16], "dynunet": [32, 32, 16], "vit_seg": [32, 32]}[model]
    assert module.hparams.roi_size == expected
    if model == "vit_seg":  # trained on the (axial) view it predicts along
        assert read_run_config(run)["datamodule"]["preprocess"]["slice_axes"] == ["axial"]


def test_ddp_on_cpu_gathers_every_validation_case_once(sweep, tmp_path):
    """Two CPU processes (gloo): the 3 validation cases are split over the ranks (the sampler pads one) and
    gathered; metrics.json holds each case exactly once and is written by rank 0 alone."""
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "adapter=cp_lora", "data.n_folds=2", "eval_base=false",
           f"paths.data={sweep}/data", f"paths.runs={sweep}/runs", f"run_dir={tmp_path}/ddp", *TINY, *TINY_UNET,
           "trainer.accelerator=cpu", "+trainer.strategy=ddp", "trainer.devices=2", "trainer.threads=1"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("phantom_sah / cp_lora / fold 0") == 1
    metrics = read_metrics(tmp_path / "ddp")
    ids = [c["case_id"] for c in metrics["cases"]]
    split = json.loads((sweep / "data/phantom_sah/splits_2fold_seed0.json").read_text(encoding="utf-8"))
    assert sorted(ids) == sorted(split[0]["val"]) and len(ids) == 3
    assert metrics["val"]["n_cases"] == 3


def test_validate_says_which_network_it_scored(tmp_path):
    """A run folder's last.ckpt is the last step's network; with model selection scripts/train.py prints (and saves)
    the selected one: validate says so with both numbers, so that a lower Dice than train.py's is explained."""
    from segadapt.training.lightning_cli import scored_network

    (tmp_path / METRICS_FILE).write_text(json.dumps({"global_step": 60, "selection": {"selected_step": 30},
                                                     "val": {"dice": 0.198}, "val_last": {"dice": 0.107}}))
    checkpoint = str(tmp_path / CHECKPOINT_FILE)
    assert scored_network(checkpoint, 60) == (
        f"scored {checkpoint}: the network at step 60, the last one; model selection chose step 30 for the run's saved "
        "network (what predict and export use): metrics.json 'val' (Dice 0.198 on the fold's validation cases) is that "
        "network, 'val_last' (Dice 0.107) this one")
    assert scored_network(checkpoint, 40) == f"scored {checkpoint}: the network at step 40"  # not the run's last step
    assert "no trained weights loaded" in scored_network(None, None)
