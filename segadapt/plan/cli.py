"""``segadapt plan DATASET_JSON``: fingerprint + plan, written as JSON and printed (:mod:`segadapt.plan.planner`)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from segadapt.data.dataset_json import dataset_spatial_dims, load_dataset_json
from segadapt.io import check_output_file, write_json
from segadapt.data.splits import NNUNET_SPLITS_FILE, find_nnunet_splits
from segadapt.parsers import plan_parser

from .fingerprint import fingerprint
from .planner import Plan, format_plan, make_plan


def check_plan_outputs(dataset_json: str | os.PathLike, outputs: Sequence[str | os.PathLike],
                       overwrite: bool = False) -> None:
    """Refuse, before any case is read, plan outputs that would replace the dataset's description or one of its
    files (images, labels, splits), land in its image / label folders, be one file twice, or -- unless
    `overwrite` -- replace an existing file. Paths are compared resolved (symlinks followed).

    Raises:
        ValueError: naming the output and what it would replace.
    """
    description = load_dataset_json(dataset_json)
    case_files = [p for c in description.cases for p in (*c.images, c.label)]
    case_files += [p for _, images in description.test_images for p in images]
    files = {p.resolve() for p in [description.path, *case_files, find_nnunet_splits(description)] if p is not None}
    folders = {p.resolve() if p.is_dir() else p.resolve().parent for p in case_files} - {description.root.resolve()}
    resolved = [Path(p).resolve() for p in outputs]
    for given, path in zip(outputs, resolved):
        split_name = path.parent == description.root.resolve() and (
            path.name == NNUNET_SPLITS_FILE or re.fullmatch(r"splits_\d+fold_seed\d+\.json", path.name))
        if path in files or split_name:
            raise ValueError(f"{given} is a file of the dataset {description.path} (its description, a case or its "
                             "splits): write the plan elsewhere")
        folder = next((f for f in folders if path.is_relative_to(f)), None)
        if folder is not None:
            raise ValueError(f"{given} is inside the dataset's case folder {folder}: write the plan elsewhere")
        check_output_file(given, "plan output")
        if path.exists() and not overwrite:
            raise ValueError(f"{given} exists; give --overwrite to replace it")
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"--out and --fingerprint name one file ({outputs[0]}): give two file names")


def main(argv: Sequence[str] | None = None) -> Plan:
    """``segadapt plan DATASET_JSON``: fingerprint + plan, written as JSON and printed; bad input exits 2."""
    parser = plan_parser()  # in segadapt.parsers: `segadapt plan --help` imports no torch
    args = parser.parse_args(argv)
    out = Path(args.out)
    fp_file = Path(args.fingerprint) if args.fingerprint else out.parent / "fingerprint.json"
    try:
        check_plan_outputs(args.dataset_json, [out, fp_file], args.overwrite)
        start = time.perf_counter()
        spatial_dims = args.spatial_dims or dataset_spatial_dims(load_dataset_json(args.dataset_json))
        fp = fingerprint(args.dataset_json, orientation=args.orientation, spatial_dims=spatial_dims)
        seconds = time.perf_counter() - start
        plan = make_plan(fp, args.memory_gb, args.patch_voxels, args.slice_pixels, args.intensity)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"segadapt plan: error: {error}\n")
    write_json(fp_file, fp)
    plan.to_json(out)
    print(f"fingerprint: {fp['n_cases']} cases read in {seconds:.1f} s -> {fp_file}")
    print(format_plan(plan))
    print(f"plan: {out}")
    return plan


if __name__ == "__main__":
    main()
