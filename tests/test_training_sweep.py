"""Local sweeps in one process: the runs of a 2-method x 2-fold sweep write what separate runs write, the
preprocessed cases and the base's scores are built once; ``scripts/train.py --help`` does not import torch;
the Slurm launcher's code runs a 2-job sweep through submitit's local executor; a sweep killed with SIGKILL
and run again skips its finished run and resumes the killed one to the uninterrupted sweep's results."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors import safe_open

from segadapt.data.cache import CASES
from segadapt.plan import apply as planning
from segadapt.runs import read_metrics
from segadapt.training import train
from segadapt.training.config import gpu_precision, trainer_args
from segadapt.training.jobs import pretrain
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
            assert timing["data_s"] > 0 and abs(timing["other_s"]) < 0.01 * timing["total_s"]  # every second named
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
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
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
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900,
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


SWEEP_KILL_DRIVER = textwrap.dedent("""
    import os, runpy, signal, sys
    import lightning.pytorch as pl
    import segadapt.training.fit as run

    KILL_AT = int(sys.argv[1])

    class Kill(pl.Callback):  # SIGKILL of the whole sweep process in the run of fold 1, at step KILL_AT
        def __init__(self, run_dir):
            self.run_dir = run_dir

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.run_dir.name == "fold1" and trainer.global_step == KILL_AT:
                os.kill(os.getpid(), signal.SIGKILL)

    make_trainer = run.make_trainer

    def killing_trainer(run_dir, *args, **kwargs):
        trainer = make_trainer(run_dir, *args, **kwargs)
        trainer.callbacks.append(Kill(run_dir))
        return trainer

    run.make_trainer = killing_trainer
    sys.argv = sys.argv[2:]  # scripts/train.py -m ...
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def _digests(run: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {n: hashlib.sha256((run / n).read_bytes()).hexdigest() for n in names}


def test_a_killed_sweep_run_again_skips_the_finished_run_and_resumes_the_killed_one(world, tmp_path):
    """``scripts/train.py -m fold=0,1`` killed with SIGKILL in fold 1 (after its checkpoint of step 2, fold 0
    finished), then the same command again: fold 0 is skipped (one line, its files untouched), fold 1 resumes from
    its last.ckpt, and both end with the metrics and adapter of the sweep that was never interrupted."""
    steps, kill_at = 5, 3
    common = [f"paths.data={world['root']}/data", *TINY, f"base_checkpoint={world['base']}",
              f"pretrain.run_dir={world['pretrain_dir']}", "adapter=cp_lora", f"trainer.max_steps={steps}",
              "checkpoint_every=2", "adapter.lr=0.05"]
    command = [str(REPO / "scripts/train.py"), "-m", "fold=0,1", f"paths.runs={tmp_path / 'killed'}", *common]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("SEGADAPT_DEBUG", None)
    driver = tmp_path / "kill.py"
    driver.write_text(SWEEP_KILL_DRIVER, encoding="utf-8")
    done = subprocess.run([sys.executable, str(driver), str(kill_at), *command], cwd=tmp_path, env=env,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert done.returncode == -9, done.stderr[-3000:]
    fold0, fold1 = (tmp_path / f"killed/phantom_sah/multiview_unet/cp_lora/fold{k}" for k in FOLDS)
    assert (fold0 / "metrics.json").is_file() and (fold1 / "last.ckpt").is_file() and not (fold1 / "metrics.json").exists()
    kept = ("metrics.json", "adapter.safetensors", "last.ckpt", "config.yaml", "logs/metrics.csv")
    before = _digests(fold0, kept)

    done = subprocess.run([sys.executable, *command], cwd=tmp_path, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipped {fold0}: a finished run with these settings (metrics.json); overwrite=true trains it again" in done.stdout
    assert f"resuming {fold1} from its last.ckpt: it was stopped before it finished (no metrics.json)" in done.stdout
    assert "sweep: 1 runs in" in done.stdout  # only fold 1 trained
    assert _digests(fold0, kept) == before
    assert read_metrics(fold1)["cost"]["resumed_from_step"] == 2

    clear_caches()
    for fold, run in zip(FOLDS, (fold0, fold1)):  # the uninterrupted sweep: the same jobs in one process
        train(_cfg(world["root"], *common[1:], f"fold={fold}", f"paths.runs={tmp_path / 'whole'}"))
        whole = tmp_path / f"whole/phantom_sah/multiview_unet/cp_lora/fold{fold}"
        assert _untimed(read_metrics(whole)) == _untimed(read_metrics(run))  # Dice of every case, exactly
        assert _adapter(whole) == _adapter(run)
