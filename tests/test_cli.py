"""The ``segadapt`` command: every subcommand exits 0 on success and 2 with one ``error:`` line on a user error;
``--help`` lists them all without importing torch; every option has help; the shipped example configs run; a
short fit is quiet (no warning from segadapt's own code, no third-party noise); ``segadapt test`` scores the
dataset's labelled test split and refuses a dataset without one."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch  # noqa: F401 (its console handler keeps the stderr of its first import: not a test's capture)
import pytest
import yaml

from segadapt.cli import COMMANDS, config_argv, main, report_main, run
from segadapt.data import load_dataset_json, load_test_cases
from segadapt.parsers import PARSERS
from segadapt.runs import read_metrics, read_run_config

REPO = Path(__file__).resolve().parents[1]
RUN = "cli/lora_c/fold0"  # the run folder `segadapt fit` writes (trainer.default_root_dir), beside the config
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
NOISE = ("LightningCLI's args", "Tip:", "litlogger", "LeafSpec", "get_mask_edges", "nvImageCodec", " object at 0x",
         "Epoch ", "GPU available", "TPU available", "Sanity Checking", "Validation")


def _segadapt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segadapt", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=300)


@pytest.fixture(scope="module")
def world(demo_runs, tmp_path_factory) -> dict:
    """A copy of the demo's target dataset (3 phantom cases, editable here), the demo's runs and base."""
    root = tmp_path_factory.mktemp("cli")
    config = read_run_config(demo_runs[0])
    source = Path(config["datamodule"]["dataset_json"]).parent
    shutil.copytree(source, root / "sah")
    return {"root": root, "runs": demo_runs, "config": config, "dataset": root / "sah" / "dataset.json"}


def fit_config(world: dict, path: Path, **trainer) -> Path:
    """configs/cli/fit.yaml pointed at the demo's base and data, for 2 steps: what the shipped example runs."""
    cfg = yaml.safe_load((REPO / "configs/cli/fit.yaml").read_text(encoding="utf-8"))
    module, data = world["config"]["module"], world["config"]["datamodule"]
    cfg["model"].update(model_kwargs=module["model_kwargs"], base_checkpoint=module["base_checkpoint"])
    cfg["data"].update(dataset_json=str(world["dataset"]), preprocess=data["preprocess"])
    cfg["trainer"].update({"max_steps": 2, "log_every_n_steps": 1, "default_root_dir": str(path.parent / RUN), **trainer})
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def expect_user_error(argv: list[str], capsys, message: str) -> None:
    """`segadapt argv` exits 2 with one line on stderr that says `error:` and contains `message` (no usage text,
    no traceback; Lightning's own INFO lines such as 'Seed set to 0' may come before it)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2, (argv, err)
    assert [line for line in err if "error:" in line] == err[-1:] and message in err[-1], (argv, err)
    assert not [line for line in err if line.startswith(("usage:", "Traceback", "tip:", " "))], (argv, err)


# ---- help --------------------------------------------------------------------------------------------------
def test_help_lists_every_subcommand_on_one_line_without_importing_torch(tmp_path):
    done = _segadapt("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for name, (summary, _) in COMMANDS.items():
        assert sum(bool(re.match(rf"\s+{name}\s+{re.escape(summary)}$", line)) for line in lines) == 1, (name, done.stdout)
    assert set(COMMANDS) == {"fit", "validate", "test", "predict", "report", "export", "plan", "diagnose", "auto"}
    code = ("import sys\nfrom segadapt.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n    code = e.code\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'monai', 'numpy'}), code)")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[] 0", done.stdout + done.stderr


def _options_without_help(text: str) -> list[str]:
    """Options of an argparse / jsonargparse help text whose description is empty or only '(type: ...)'."""
    entries = re.split(r"\n  (?=\S)", text.split("\noptions:", 1)[-1] if "positional arguments" not in text
                       else text.split("\npositional arguments:", 1)[1])
    missing = []
    for entry in entries:
        first, *rest = entry.split("\n")
        invocation, _, inline = first.strip().partition("  ")
        description = " ".join([inline.strip(), *(line.strip() for line in rest)]).strip()
        if invocation and (not description or description.startswith("(type:") or description.startswith("(required, type:")):
            missing.append(invocation)
    return missing


def test_subcommand_help_is_the_commands_own_without_importing_torch(capsys):
    """`segadapt predict|report|export|plan|diagnose --help` import no torch (checked in a fresh process) and print
    what the command's own main prints; the defaults the parsers repeat are the commands' constants."""
    code = ("import sys\nfrom segadapt.cli import main\nfor command in sys.argv[1:]:\n    try:\n"
            "        main([command, '--help'])\n    except SystemExit as e:\n        print('EXIT', e.code)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'monai', 'numpy'}))")
    done = subprocess.run([sys.executable, "-c", code, *PARSERS], env=ENV, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "[]" and lines.count("EXIT 0") == len(PARSERS), done.stdout[-2000:] + done.stderr[-2000:]
    import segadapt.data.config
    import segadapt.plan.cli
    import segadapt.plan.nnunet
    import segadapt.plan.topology
    import segadapt.export.cli
    import segadapt.inference.cli
    import segadapt.inference.diagnose
    import segadapt.training.auto
    from segadapt import parsers

    assert parsers.INTENSITY_MODES == segadapt.data.config.INTENSITY_MODES
    assert parsers.REFERENCE_GB == segadapt.plan.topology.REFERENCE_GB
    assert (parsers.TOP_K, parsers.EPSILON) == (segadapt.inference.diagnose.TOP_K, segadapt.inference.diagnose.EPSILON)
    assert parsers.DIAGNOSE_SUMMARY == segadapt.inference.diagnose.__doc__.splitlines()[0]
    assert parsers.NNUNET_SCHEMES == tuple(sorted(segadapt.plan.nnunet._SCHEMES))
    own = {"predict": segadapt.inference.cli.main, "export": segadapt.export.cli.main, "plan": segadapt.plan.cli.main,
           "diagnose": segadapt.inference.diagnose.main, "report": report_main, "auto": segadapt.training.auto.main}
    for command, command_main in own.items():
        with pytest.raises(SystemExit):
            command_main(["--help"])
        text = capsys.readouterr().out
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0 and capsys.readouterr().out == text != ""


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_of_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    if command in ("fit", "validate", "test"):  # segadapt's own options: the module's and data module's arguments
        own = "\n".join(part for part in text.split("\n\n") if "--model." in part or "--data." in part)
        for name in ("lr", "roi_size", "sw_batch_size", "overlap"):
            assert f"--model.{name}" in own
        assert "--data.splits_path" in own and "--optimizer" not in text
        assert _options_without_help(own) == []
    else:
        assert _options_without_help(text) == [], text


NOTICES = """
import logging, sys, warnings
logging.basicConfig(level=logging.INFO, stream=sys.stdout)  # a handler for every logger, as Lightning's / Jupyter's
if sys.argv[1] == "setup":
    from segadapt.console import setup_console
    setup_console()
    assert "torch" not in sys.modules
for logger, level, message in [
        ("monai.data.nvimgcodec_pydicom_plugin", logging.WARNING,
         "nvImageCodec is not available; skipping pydicom decoder plugin registration."),
        ("lightning.pytorch.utilities.rank_zero", logging.INFO, "GPU available: False, used: False"),
        ("lightning.pytorch.utilities.rank_zero", logging.INFO, "TPU available: False, using: 0 TPU cores"),
        ("lightning.fabric.utilities.rank_zero", logging.INFO, "GPU available: False, used: False"),
        ("lightning.pytorch.utilities.rank_zero", logging.INFO, "`Trainer.fit` stopped: `max_steps=2` reached."),
        ("lightning.pytorch.utilities.rank_zero", logging.WARNING, "a real warning stays")]:
    logging.getLogger(logger).log(level, message)
TqdmWarning = type("TqdmWarning", (Warning,), {})
for message, category, module in [
        ("IProgress not found. Please update jupyter and ipywidgets.", TqdmWarning, "tqdm.auto"),
        ("NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register; falling back", UserWarning,
         "monai.data.image_reader"),
        ("`LeafSpec` is deprecated", FutureWarning, "lightning.pytorch.utilities._pytree"),
        ("a segadapt warning stays", UserWarning, "segadapt.inference")]:
    warnings.warn_explicit(message, category, module.replace(".", "/") + ".py", 1, module=module)
"""


def test_a_command_start_silences_the_notices_of_a_notebook_and_a_sweep():
    """setup_console (a command's start, a notebook's first cell) drops MONAI's nvImageCodec record and warning,
    Lightning's rank-zero notices (GPU/TPU available, fit stopped), tqdm's IProgress warning in Jupyter and
    torch's LeafSpec FutureWarning, without importing torch; warnings of other sources stay. Without it, all show."""
    quiet, loud = (subprocess.run([sys.executable, "-c", NOTICES, mode], env=ENV, capture_output=True, text=True, encoding="utf-8", errors="replace",
                                  timeout=60) for mode in ("setup", "bare"))
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    lines = [line for line in (quiet.stdout + quiet.stderr).splitlines() if line.strip() and not line.startswith("  ")]
    assert len(lines) == 2 and "a real warning stays" in lines[0] and "a segadapt warning stays" in lines[1], lines
    shown = loud.stdout + loud.stderr
    assert all(text in shown for text in ("nvImageCodec is not available", "GPU available", "TPU available",
                                          "stopped", "IProgress", "NvImgCodecPydicomReader", "LeafSpec")), shown


# ---- fit / validate / test ---------------------------------------------------------------------------------
STRICT = ("import sys, warnings\nwarnings.filterwarnings('error', module=r'segadapt(\\..*)?$')\n"
          "from segadapt.cli import main\nsys.exit(main(sys.argv[1:]))")


@pytest.fixture(scope="module")
def fitted(world) -> dict:
    """`segadapt fit --config` in a new process on the shipped fit.yaml (pointed at tiny data: 2 steps, the
    progress bar on, an inner split validated at every step, so HD95 runs too, and the selected network is saved),
    with warnings raised from segadapt's modules turned into errors."""
    root = world["root"] / "fitted"
    root.mkdir()
    config = fit_config(world, root / "fit.yaml", enable_progress_bar=True, val_check_interval=1)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["inner_fraction"] = 0.5
    config.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-c", STRICT, "fit", "--config", str(config)], cwd=root, env=ENV,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    return {"config": config, "done": done, "run": root / RUN, "checkpoint": root / RUN / "last.ckpt"}


def test_fit_exits_0_quietly_with_a_step_progress_bar(fitted):
    """The real exit code (not 1 with the CLI object printed), no warning from segadapt's code (errors here), one
    progress bar in steps (no validation or sanity-check bars, though the inner split is validated at every
    step), and none of the third-party noise (LightningCLI's args warning, litlogger tip, LeafSpec, MONAI's
    get_mask_edges and nvImageCodec, Lightning's "GPU available" block)."""
    done = fitted["done"]
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert [noise for noise in NOISE if noise in output] == [], output[-3000:]
    assert re.search(r"Training: 100%.*\| 2/2 \[", output), output[-3000:]
    assert fitted["checkpoint"].is_file()


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_fit_writes_a_run_folder_that_every_command_opens(fitted, world, tmp_path, capsys):
    """`segadapt fit` writes scripts/train.py's run folder (segadapt.runs) into trainer.default_root_dir:
    predict --run, export, diagnose and report open it; its config.yaml records the fit's own settings."""
    assert fitted["done"].returncode == 0, fitted["done"].stderr[-3000:]
    run = fitted["run"]
    for name in ("config.yaml", "metrics.json", "adapter.safetensors", "last.ckpt", "fingerprint.json", "logs/metrics.csv"):
        assert (run / name).is_file(), name
    assert "cli / lora_c / fold 0: 1 validation volumes" in fitted["done"].stdout  # scripts/train.py's summary
    config, metrics = read_run_config(run), read_metrics(run)
    asked = yaml.safe_load(fitted["config"].read_text(encoding="utf-8"))
    assert config["module"]["adapter"] == asked["model"]["adapter"] and config["module"]["lr"] == asked["model"]["lr"]
    assert config["module"]["base_checkpoint"] == str(Path(asked["model"]["base_checkpoint"]).resolve())
    assert config["datamodule"]["dataset_json"] == str(world["dataset"].resolve())
    assert config["datamodule"]["inner_fraction"] == 0.5 and config["trainer"]["max_steps"] == 2
    assert metrics["global_step"] == 2 and [c["step"] for c in metrics["selection"]["curve"]] == [1, 2]
    scan = load_dataset_json(world["dataset"]).cases[0].image
    assert main(["predict", "--run", str(run), "--input", str(scan), "--output", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / f"{scan.name.split('.')[0]}_mask.nii.gz").is_file()
    assert main(["export", str(run), "--merged", str(tmp_path / "merged.safetensors")]) == 0
    assert main(["diagnose", str(run), "--out", str(tmp_path / "diagnose")]) == 0
    assert (tmp_path / "diagnose" / "diagnose.csv").is_file()
    assert main(["report", str(run.parents[1]), "--out", str(tmp_path / "report")]) == 0
    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open(encoding="utf-8")))
    assert [r["method"] for r in rows] == ["none", "lora_c"]
    assert float(rows[1]["dice_mean"]) == pytest.approx(metrics["val"]["dice"])
    capsys.readouterr()


def test_validate_exits_0_and_test_refuses_without_a_test_split(fitted, world, tmp_path, capsys):
    config = str(fitted["config"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("error", module=r"segadapt(\..*)?$")
        assert main(["validate", "--config", config, "--ckpt_path", "last", "--trainer.enable_progress_bar", "false"]) == 0
    assert not [str(w.message) for w in caught if "LightningCLI's args" in str(w.message)]
    expect_user_error(["test", "--config", config, "--ckpt_path", "last"], capsys, "has no labelled test split")
    before = _tree(fitted["run"])
    expect_user_error(["fit", "--config", config, "--overwrite", "true", "--data.dataset_json", str(tmp_path / "none.json")],
                      capsys, f"dataset description not found: {tmp_path / 'none.json'}")
    assert _tree(fitted["run"]) == before  # the finished run is kept: nothing is removed before the data is read


def test_test_scores_the_labelled_test_split(fitted, world, tmp_path):
    """imagesTs/ + labelsTs/ beside dataset.json: `segadapt test` scores exactly those cases, which
    `validate` never sees; the same files listed as dataset.json 'test' entries give the same scores."""
    data = tmp_path / "sah"
    shutil.copytree(world["dataset"].parent, data)
    description = load_dataset_json(data / "dataset.json")
    for folder in ("imagesTs", "labelsTs"):
        (data / folder).mkdir()
    tbi = load_dataset_json(Path(world["config"]["datamodule"]["dataset_json"]).parents[1] / "tbi" / "dataset.json")
    for k, case in enumerate(tbi.cases[:2]):  # other heads, other lesions: a held-out test set
        shutil.copy(case.image, data / "imagesTs" / f"held_{k}.nii.gz")
        shutil.copy(case.label, data / "labelsTs" / f"held_{k}.nii.gz")
    assert [c.case_id for c in load_test_cases(data / "dataset.json")] == ["held_0", "held_1"]
    argv = ["test", "--config", str(fitted["config"]), "--data.dataset_json", str(data / "dataset.json"),
            "--ckpt_path", str(fitted["checkpoint"]), "--trainer.enable_progress_bar", "false"]
    assert main(argv) == 0
    tested = run(argv)
    rows = tested.model.case_rows
    assert [r["case_id"] for r in rows] == ["held_0", "held_1"]
    assert float(tested.trainer.callback_metrics["test/n_cases"]) == 2
    assert not {r["case_id"] for r in rows} & {c.case_id for c in description.cases}
    # the same cases as dataset.json 'test' entries (imagesTs/ moved away): the same rows
    raw = json.loads((data / "dataset.json").read_text())
    raw["test"] = [{"image": f"held/imagesTs/held_{k}.nii.gz", "label": f"held/labelsTs/held_{k}.nii.gz",
                    "case_id": f"held_{k}"} for k in range(2)]
    (data / "held").mkdir()
    for folder in ("imagesTs", "labelsTs"):
        shutil.move(data / folder, data / "held" / folder)
    (data / "dataset.json").write_text(json.dumps(raw))
    assert run(argv).model.case_rows == rows


def test_test_split_entries(tmp_path, world):
    data = tmp_path / "sah"
    shutil.copytree(world["dataset"].parent, data)
    raw = json.loads((data / "dataset.json").read_text())
    raw["test"] = ["imagesTr/x.nii.gz"]  # a Decathlon test list: images without labels
    (data / "dataset.json").write_text(json.dumps(raw))
    assert load_test_cases(data / "dataset.json") == ()
    raw["test"] = [dict(raw["training"][0])]  # a training case listed as a test case
    (data / "dataset.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="is also a training case"):
        load_test_cases(data / "dataset.json")


# ---- the argparse subcommands --------------------------------------------------------------------------------
def test_predict_report_export_plan_diagnose_exit_0(world, tmp_path, capsys):
    runs = world["runs"]
    scan = load_dataset_json(world["dataset"]).cases[0].image
    example = yaml.safe_load((REPO / "configs/cli/predict.yaml").read_text(encoding="utf-8"))
    example.update(run=[str(r) for r in runs], input=str(scan), output=str(tmp_path / "wrong"))
    (tmp_path / "predict.yaml").write_text(yaml.safe_dump(example))
    # the example config, with the output given on the command line (it wins)
    assert main(["predict", "--config", str(tmp_path / "predict.yaml"), "--output", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / f"{scan.name.split('.')[0]}_mask.nii.gz").is_file() and not (tmp_path / "wrong").exists()
    experiment = tmp_path / "experiment"
    shutil.copytree(runs[0], experiment / "multiview_unet" / "cp_lora" / "fold0")
    assert main(["report", str(experiment), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.csv").is_file()
    assert main(["export", str(runs[0]), "--merged", str(tmp_path / "merged.safetensors")]) == 0
    assert (tmp_path / "merged.safetensors").is_file()
    assert main(["plan", str(world["dataset"]), "--out", str(tmp_path / "plan.json")]) == 0
    assert json.loads((tmp_path / "plan.json").read_text())
    assert main(["diagnose", str(runs[0]), "--out", str(tmp_path / "diagnose")]) == 0
    assert (tmp_path / "diagnose" / "diagnose.csv").is_file()
    capsys.readouterr()


def test_user_errors_exit_2_with_one_line(world, tmp_path, capsys):
    missing = tmp_path / "missing"
    (tmp_path / "file").write_text("x")
    corrupt = tmp_path / "experiment" / "lora_c" / "fold0" / "metrics.json"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_text("{not json")
    for argv, message in [
        ([], "the following arguments are required: COMMAND"),
        (["train"], "invalid choice: 'train'"),
        (["predict", "--run", str(world["runs"][0]), "--input", str(missing)], "input not found"),
        (["predict", "--input", str(missing)], "segadapt predict: one of the arguments --run --adapters is required"),
        (["predict", "--run", str(world["runs"][0]), "--input", str(missing), "--threshold", "high"],
         "segadapt predict: argument --threshold: invalid float value: 'high'"),
        (["report", str(missing)], f"experiment folder not found: {missing}"),
        (["report", str(tmp_path / "experiment")], f"{corrupt} is not readable JSON (Expecting property name"),
        (["export", str(world["runs"][0])], "give --merged FILE, --peft FOLDER"),
        (["export", str(world["runs"][0]), "--merged", str(tmp_path)], "is a folder; give a file name"),
        (["export", str(world["runs"][0]), "--peft", str(tmp_path / "file")], "is a file, not a folder"),
        (["plan", str(missing)], "dataset description not found"),
        (["diagnose", str(missing)], str(missing)),
        (["report", "--config", str(tmp_path / "file")], "expected 'option: value' lines"),
        (["validate", "--config", str(missing)], str(missing)),
        (["fit", "--data.dataset_json", "x.json", "--model.lr", "abc"], 'segadapt fit: Parser key "model.lr": Expected a'),
        (["test", "--nothing", "3"], "segadapt test: unrecognized arguments: --nothing 3"),
    ]:
        expect_user_error(argv, capsys, message)


def test_report_of_folds_with_different_settings_warns_in_one_line(tmp_path, capsys):
    """`segadapt report` on a method whose two folds ran 1500 and 2 steps: exit 0, the row flagged, and one
    `warning:` line on stderr naming the method and the setting."""
    for fold, steps in ((0, 1500), (1, 2)):
        folder = tmp_path / "experiment" / "lora_c" / f"fold{fold}"
        folder.mkdir(parents=True)
        case = {"case_id": f"c{fold}", "dice": 0.5 + 0.1 * fold, "hd95": 2.0, "pred_ml": 1.0, "true_ml": 1.0}
        metrics = {"format": "segadapt-metrics/1", "run": {"experiment": "x", "method": "lora_c", "tuning": "lora_c",
                   "fold": fold}, "val": {"dice": case["dice"]}, "volume_bins_ml": [0, None], "cases": [case]}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        config = {"format": "segadapt-run/1", "run": {"fold": fold, "seed": fold, "run_dir": str(folder)},
                  "datamodule": {"fold": fold}, "trainer": {"max_steps": steps}}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["report", str(tmp_path / "experiment"), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: method 'lora_c' pools folds trained with different settings (fold 1: trainer.max_steps: "
                   "1500 -> 2): its row is flagged ³ in the report"], err
    assert "lora_c ⚠³" in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")


def test_config_file_options_come_first(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("run: [a, b]\ninput: x.nii.gz\nprobabilities: true\nno_progress: false\nthreshold: null\n")
    assert config_argv(["--config", str(config), "--input", "y.nii.gz"]) == [
        "--run", "a", "b", "--input", "x.nii.gz", "--probabilities", "--input", "y.nii.gz"]
    assert config_argv(["--input", "y"]) == ["--input", "y"]


def test_a_user_error_after_a_progress_bar_stops_tqdms_monitor_and_does_not_wait(monkeypatch, capsys):
    """tqdm's monitor thread (started by a command's first progress bar, never ending by itself) is stopped when a
    user error exits, so the exit does not wait out the 5 s that MONAI's cache workers may have."""
    import tqdm

    from segadapt.errors import user_errors

    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 10)  # conftest turns the monitor off for the other tests
    with tqdm.tqdm(total=1, disable=False, file=io.StringIO()) as bar:
        bar.update()
    monitor = tqdm.tqdm.monitor
    assert monitor is not None and monitor.is_alive()
    with pytest.raises(SystemExit):
        with user_errors():
            raise FileNotFoundError(2, "No such file or directory", "nowhere.json")
    assert not monitor.is_alive()
    assert capsys.readouterr().err == "error: No such file or directory: nowhere.json\n"
