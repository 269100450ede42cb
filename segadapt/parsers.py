"""The argument parsers of the argparse subcommands (predict, report, export, plan, diagnose, auto).

They live here, in a module that imports nothing heavy, so that ``segadapt COMMAND --help`` answers without
importing torch, Lightning or MONAI (:func:`segadapt.cli.run`); each command's ``main`` parses its command line
with the same parser, so the help is the command's own. The few defaults shown in a help text are the
commands' own constants, repeated here because their modules import torch; a test checks that they agree.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from segadapt.errors import OneLineParser

# segadapt.data.config.INTENSITY_MODES, segadapt.plan.topology.REFERENCE_GB, segadapt.inference.diagnose.TOP_K / EPSILON,
# segadapt.plan.nnunet's normalisation schemes
INTENSITY_MODES = ("ct", "ct_zscore", "zscore", "mri", "rgb")
REFERENCE_GB = 8.0
TOP_K, EPSILON = 10, 0.5
NNUNET_SCHEMES = ("ct_zscore", "mri", "rgb", "zscore")  # segadapt.plan.nnunet's intensity modes with an nnU-Net scheme
SEGMENT_CODE_HELP = ("LABEL=CATEGORY/TYPE, LABEL a label value or name, CATEGORY and TYPE each a SNOMED CT keyword of "
                     "pydicom.sr.codedict (AnatomicalStructure, Brain) or SCHEME:VALUE:MEANING (SCT:12738006:Brain)")
DIAGNOSE_SUMMARY = ("Spectral diagnostics of what a tuning did to each layer: ``segadapt diagnose RUN_DIR "
                    "[RUN_DIR ...]``.")  # the first line of segadapt.inference.diagnose's docstring


def predict_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="segadapt predict",
        description="Segment CT scans with the fold adapters of a run on their shared base: masks on each "
                    "input's grid, lesion volumes in volumes.csv.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", nargs="+", metavar="RUN_DIR",
                        help="run folder(s) with config.yaml + adapter.safetensors; several = fold ensemble")
    source.add_argument("--adapters", nargs="+", metavar="FILE", help="adapter files made on one base")
    parser.add_argument("--run-config", metavar="PATH",
                        help="with --adapters: the run's config.yaml (or its folder) giving network and "
                             "preprocessing (default: the folder of the first adapter)")
    parser.add_argument("--base", metavar="FILE", help="base checkpoint (default: the run config's)")
    parser.add_argument("--input", "-i", required=True, metavar="PATH",
                        help="NIfTI / NRRD / MHA file, DICOM series folder, 2D image (PNG, JPEG, BMP, TIFF), or a folder of those")
    parser.add_argument("--output", "-o", default="predictions", metavar="DIR", help="output folder (default: %(default)s)")
    parser.add_argument("--probabilities", action="store_true", help="also write the probability maps")
    parser.add_argument("--dicom-seg", metavar="OUT.dcm",
                        help="also write the mask as a DICOM-SEG object referencing the input DICOM series "
                             "(one DICOM series folder as --input; needs highdicom: the 'dicom' extra)")
    parser.add_argument("--segment-code", action="append", default=[], metavar="LABEL=CATEGORY/TYPE",
                        help="with --dicom-seg: the DICOM code of a segment whose label segadapt does not know "
                             f"(repeatable): {SEGMENT_CODE_HELP}")
    parser.add_argument("--threshold", type=float, help="foreground probability threshold (default: the run's)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar over a folder")
    parser.add_argument("--force", action="store_true",
                        help="load adapters made on a base with the same modules and shapes but other weights "
                             "(a warning instead of an error)")
    return parser


def report_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="segadapt report", description="Cross-validation report of a folder of runs "
                           "(<experiment>/<model>/<method>/fold<k>/metrics.json): report.md, report.csv, "
                           "report_folds.csv, plots as PNG, SVG and PDF.")
    parser.add_argument("experiment_dir", help="the experiment folder, e.g. runs/phantom_sah")
    parser.add_argument("--out", help="output folder (default: the experiment folder)")
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="segadapt export",
                                     description="Export a run's adapter: merged plain model, PEFT format and/or MONAI bundle.")
    parser.add_argument("run_dir", help="run folder (config.yaml + adapter.safetensors or model.safetensors)")
    parser.add_argument("--merged", metavar="FILE", help="write the merged plain model (safetensors)")
    parser.add_argument("--peft", metavar="FOLDER", help="write the adapter in PEFT's format (LoRA/DoRA methods)")
    parser.add_argument("--bundle", metavar="FOLDER",
                        help="write a MONAI bundle (configs/inference.json, metadata.json, logging.conf, models/model.pt) "
                             "of the merged network")
    parser.add_argument("--force", action="store_true",
                        help="overwrite existing output files (never the run's own files, its base or its data), and "
                             "load an adapter made on a base with the same modules but other weights (a warning)")
    parser.add_argument("--nnunet", metavar="FOLDER", help="write the merged network as an nnU-Net trained-model "
                        "folder (model=nnunet runs; segadapt.export.nnunet.export_nnunet)")
    return parser


def plan_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="segadapt plan", description="Dataset fingerprint and nnU-Net-style plan "
                                     "(spacing, patch/slice size, batch size, normalisation, network).")
    parser.add_argument("dataset_json", help="the dataset description (Decathlon-style dataset.json)")
    parser.add_argument("--out", default="plan.json", help="plan file (default: plan.json)")
    parser.add_argument("--fingerprint", help="fingerprint file (default: fingerprint.json beside --out)")
    parser.add_argument("--memory-gb", type=float, default=REFERENCE_GB, help="memory to plan for (default 8)")
    parser.add_argument("--patch-voxels", type=int, help="3D patch budget at batch 2 (default 128^3 x GB / 8)")
    parser.add_argument("--slice-pixels", type=int, help="2D slice budget at batch 12 (default 512^2 x GB / 8)")
    parser.add_argument("--intensity", choices=INTENSITY_MODES, help="override the modality's normalisation")
    parser.add_argument("--orientation", help="axis codes to reorient to (default RAS, RA for 2D)")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3),
                        help="3 for volumes, 2 for 2D images (default: 2 for 2D image files, as training decides)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --out / --fingerprint files")
    return parser


def diagnose_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="segadapt diagnose", description=DIAGNOSE_SUMMARY)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (adapter or full fine-tuning)")
    parser.add_argument("--out", default=".", help="folder for diagnose.csv and diagnose.png (default: .)")
    parser.add_argument("--top-k", type=int, default=TOP_K, help=f"singular vectors checked for intruders (default {TOP_K})")
    parser.add_argument("--epsilon", type=float, default=EPSILON, help=f"cosine threshold of an intruder (default {EPSILON})")
    return parser


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def auto_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="segadapt auto", description="Choose the adaptation (method, rank, placement, "
                           "learning rate) per outer fold by an Optuna search on the fold's training patients "
                           "(nested: trials never see the fold's validation cases), train the choice on the fold "
                           "and score it: <runs>/<experiment>/auto.json, <model>/auto/fold<k>/. The same command "
                           "after a kill resumes the search.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="run settings as for scripts/train.py (data=..., trainer.max_steps=100); auto.KEY=VALUE "
                             "narrows the search space of --space (auto.methods=[lora_c,full] auto.ranks=[4,8])")
    parser.add_argument("--trials", type=int, help="trials per outer fold, those of an earlier session included")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="start no further trial of a fold after this many seconds of this session")
    parser.add_argument("--folds", type=_int_list, metavar="K[,K...]", help="outer folds to search, e.g. 0,2 (default: all)")
    parser.add_argument("--config-dir", default="configs", help="the configs folder (default: %(default)s)")
    parser.add_argument("--space", help="the search space (default: <config-dir>/auto.yaml)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="worker processes on the same studies (default 1; the same command in another shell "
                             "or Slurm job joins as further workers)")
    return parser


def nnunet_plans_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m segadapt.plan.nnunet",
                           description="nnU-Net plans for a PlainConvUNet on a dataset's segadapt plan")
    parser.add_argument("dataset_json")
    parser.add_argument("out_dir")
    parser.add_argument("--cache-dir", default="runs/plans", help="plan cache (default runs/plans)")
    parser.add_argument("--features", type=int, nargs="+", help="features per stage (default: the plan's)")
    parser.add_argument("--patch-size", type=int, nargs=3, help="patch size (default: the plan's)")
    parser.add_argument("--intensity", choices=NNUNET_SCHEMES, help="normalisation (default: the plan's)")
    parser.add_argument("--batch-size", type=int, help="patches per step (default: the plan's)")
    return parser


# subcommand -> its parser (segadapt.cli.COMMANDS names the function that runs it)
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "predict": predict_parser, "report": report_parser, "export": export_parser, "plan": plan_parser,
    "diagnose": diagnose_parser, "auto": auto_parser,
}
