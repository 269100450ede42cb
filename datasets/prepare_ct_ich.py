"""PhysioNet CT-ICH (Hssayeni et al., "Computed Tomography Images for Intracranial Hemorrhage Detection
and Segmentation", v1.3.1) -> dataset.json.

Expects the NIfTI layout of the download: ``<root>/ct_scans/049.nii`` and ``<root>/masks/049.nii``
(binary haemorrhage masks). Images are referenced in place; with ``--binarize`` (for copies whose masks
hold 0/255 or subtype values) binary masks are written to ``<out>/labelsTr``.

    python datasets/prepare_ct_ich.py --root ~/data/ct-ich-1.3.1 --out data/ct_ich
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segadapt.data import pair_cases_by_name, remap_label_file, write_dataset_json


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder holding ct_scans/ and masks/")
    parser.add_argument("--out", type=Path, required=True, help="folder for dataset.json (and labelsTr/)")
    parser.add_argument("--binarize", action="store_true", help="write masks > 0 as 0/1 copies")
    args = parser.parse_args(argv)
    cases = pair_cases_by_name(args.root / "ct_scans", args.root / "masks", prefix="ich_")
    if args.binarize:
        for case in cases:
            case["label"] = remap_label_file(case["label"], args.out / "labelsTr" / f"{case['case_id']}.nii.gz")
    path = write_dataset_json(args.out / "dataset.json", "ct_ich", cases, {0: "background", 1: "haemorrhage"},
                              {0: "CT"}, reference="https://physionet.org/content/ct-ich/", licence="PhysioNet")
    print(f"wrote {path} ({len(cases)} cases)")
    return path


if __name__ == "__main__":
    main()
