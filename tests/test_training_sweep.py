"""Local sweeps in one process: the runs of a 2-method x 2-fold sweep write what separate runs write, the
preprocessed cases and the base's scores are built once; ``scripts/train.py --help`` does not import torch;
the Slurm launcher's code runs a 2-job sweep through submitit's local executor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors import safe_open

from segadapt.data.cache import CASES
from segadapt.training import planning, read_metrics, train
from segadapt.training.run import gpu_precision, pretrain, trainer_args
from segadapt.training.sweep import BASE_SCORES, clear_caches, sweep_summary
from test_training_entrypoints import TINY as ENTRYPOINT_TINY, TINY_UNET  # noqa: E402 (tests/ is on sys.path)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

REPO = Path(__file__).resolve().parents[1]
TINY = [*ENTRYPOINT_TINY, *TINY_UNET, "trainer.threads=1"]  # the entry-point tests' tiny phantom world
METHODS, FOLDS = ("cp_lora", "dora_c"), (0, 1)
N_CASES = 6  # data.phantom.n
# Files whose content depends on the wall clock or the process (timings, peak memory, Hydra's record)
UNTIMED = ("cost", "timing")


def _cfg(root: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data={root}/data", f"paths.runs={root}/runs", *TINY, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def _untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in UNTIMED}


def _files(run: Path) -> set[str]:
    """The files of a run folder (TensorBoard's event files are named by time, host and process)."""
    names = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    return {n.split(".out.tfevents.")[0] + ".out.tfevents" if ".out.tfevents." in n else n for n in names}


def _adapter(run: Path) -> tuple[dict, dict]:
    """(metadata, name -> values) of a run's adapter file."""
    with safe_open(str(run / "adapter.safetensors"), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Phantom data and a tiny pretrained base shared by the runs below (`runs/base/...` of `root`)."""
    root = tmp_path_factory.mktemp("world")
    pretrain(_cfg(root))
    return {"root": root, "base": _cfg(root)["base_checkpoint"], "pretrain_dir": _cfg(root)["pretrain"]["run_dir"]}


def _runs(world: dict, out: Path, shared: bool) -> dict:
    """The 2 x 2 grid into `out`: in one process sharing the caches (`shared`), or each run from empty
    caches, as a fresh process would start it. Returns the builds counted."""
    clear_caches()
    builds = {"cases": [], "base_scores": []}
    for method in METHODS:
        for fold in FOLDS:
            if not shared:
                clear_caches()
            train(_cfg(world["root"], f"adapter={method}", f"fold={fold}", f"paths.runs={out}",
                       f"base_checkpoint={world['base']}", f"pretrain.run_dir={world['pretrain_dir']}"))
            builds["cases"].append(CASES.builds)
            builds["base_scores"].append(BASE_SCORES.builds)
    return builds


def test_a_sweep_in_one_process_writes_what_separate_runs_write_and_builds_once(world, tmp_path):
    separate = _runs(world, tmp_path / "separate", shared=False)
    together = _runs(world, tmp_path / "together", shared=True)
    # every case preprocessed once per process; the base scored once per fold (validation cases + inner split)
    assert separate["cases"] == [N_CASES] * 4 and together["cases"] == [N_CASES] * 4
    assert separate["base_scores"] == [2] * 4 and together["base_scores"] == [2, 4, 4, 4]  # (fold 0, fold 1) per method
    for method in METHODS:
        for fold in FOLDS:
            a, b = (tmp_path / k / f"phantom_sah/multiview_unet/{method}/fold{fold}" for k in ("separate", "together"))
            assert _files(a) == _files(b)
            ma, mb = read_metrics(a), read_metrics(b)
            assert _untimed(ma) == _untimed(mb)
            assert ma["base_val"] is not None and ma["base_inner_dice"] is not None
            assert _adapter(a) == _adapter(b)
            timing = mb["timing"]
            assert timing["train_steps_s"] > 0 and timing["setup_s"] > 0
            assert timing["setup_s"] + timing["train_steps_s"] + timing["validation_s"] <= timing["total_s"] + 1e-6
    # the base of a fold scores the same whichever method's run computed it
    base = {m: read_metrics(tmp_path / f"separate/phantom_sah/multiview_unet/{m}/fold1")["base_cases"] for m in METHODS}
    assert base["cp_lora"] == base["dora_c"]


def test_a_sweep_prints_its_plan_once(world, tmp_path, capsys, monkeypatch):
    """Two runs of a sweep in one process share the target's plan: it is printed by the first only."""
    monkeypatch.setattr(planning, "_printed", set())  # as in a fresh process
    capsys.readouterr()
    for fold in FOLDS:
        train(_cfg(world["root"], "adapter=cp_lora", f"fold={fold}", f"paths.runs={tmp_path}",
                   f"base_checkpoint={world['base']}", f"pretrain.run_dir={world['pretrain_dir']}"))
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith("plan of ")]) == 1, out
    assert out.count("Dice") >= 2  # both runs printed their result


def test_sweep_summary_is_the_share_of_wall_time_in_training_steps():
    runs = [{"timing": {"setup_s": 1.0, "train_steps_s": 6.0, "validation_s": 2.0, "total_s": 10.0}},
            {"timing": {"setup_s": 0.5, "train_steps_s": 9.0, "validation_s": 1.0, "total_s": 11.0}}]
    line = sweep_summary(runs, 20.0)
    assert "2 runs in 20 s wall" in line and "training steps 15 s (75% of the wall time)" in line


def test_train_script_help_does_not_import_torch():
    code = ("import runpy, sys\nsys.argv = ['train.py', '--help']\n"
            "try:\n    runpy.run_path('scripts/train.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules, 'lightning' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "== Config ==" in done.stdout or "Powered by Hydra" in done.stdout
    assert "TORCH False False" in done.stdout


def test_submitit_local_sweep_writes_the_run_folders_of_the_basic_launcher(world, tmp_path):
    """`hydra/launcher=submitit_local` (the Slurm launcher's code, each job a local process): a 2-job sweep
    writes the run folders that the basic launcher's in-process runs write, with the same metrics."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    common = [f"paths.data={world['root']}/data", *TINY, f"base_checkpoint={world['base']}",
              f"pretrain.run_dir={world['pretrain_dir']}", "adapter=cp_lora"]
    cmd = [sys.executable, str(REPO / "scripts/train.py"), "-m", "fold=0,1", "hydra/launcher=submitit_local",
           "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1", f"paths.runs={tmp_path / 'submitit'}", *common]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sweep: 2 runs in" in done.stdout  # SweepSummary, from the jobs' metrics.json
    assert len(list((tmp_path / "submitit").rglob("*_log.out"))) == 2  # two submitit jobs ran
    clear_caches()
    for fold in FOLDS:  # what the basic launcher runs in its own process, one job after the other
        train(_cfg(world["root"], *common[1:], f"fold={fold}", f"paths.runs={tmp_path / 'basic'}"))
        a, b = (tmp_path / k / f"phantom_sah/multiview_unet/cp_lora/fold{fold}" for k in ("basic", "submitit"))
        assert _untimed(read_metrics(a)) == _untimed(read_metrics(b)) and read_metrics(b)["run"]["fold"] == fold
        assert _files(a) == {f for f in _files(b) if not f.startswith(".hydra/") and f != "train.log"}  # Hydra's records


@pytest.mark.parametrize("precision, bf16, expected", [("bf16-mixed", True, "bf16-mixed"), ("bf16-mixed", False, "16-mixed"),
                                                      ("bf16-true", False, "16-mixed"), ("32-true", False, "32-true")])
def test_bf16_falls_back_to_16_mixed_on_a_gpu_without_bf16(precision, bf16, expected):
    assert gpu_precision(precision, bf16) == expected


def test_the_slurm_example_composes_one_ddp_task_per_gpu():
    """The README's Slurm line: submitit's Slurm launcher with one task per GPU and the ddp trainer."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=ddp", "hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=4",
                                          "hydra.launcher.tasks_per_node=4", "hydra.launcher.nodes=2", "trainer.num_nodes=2"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4
    args = trainer_args({"trainer": OmegaConf.to_container(cfg.trainer), "selection": {}})
    assert args["strategy"] == "ddp" and args["devices"] == -1 and "threads" not in args
    assert cfg.trainer.num_nodes == launcher.nodes == 2 and cfg.trainer.precision == "bf16-mixed"
