"""BHSD, the Brain Haemorrhage Segmentation Dataset (Wu et al., 2023) -> dataset.json.

Expects ``<root>/images/*.nii.gz`` and ``<root>/ground truths/*.nii.gz`` with labels 1 epidural,
2 intraparenchymal, 3 intraventricular, 4 subarachnoid, 5 subdural. ``--classes all`` keeps the five
subtypes; ``any`` writes binary haemorrhage masks; a subtype name (e.g. ``subarachnoid``) writes binary
masks of that subtype alone, to ``<out>/labelsTr``.

    python datasets/prepare_bhsd.py --root ~/data/BHSD/label_192 --out data/bhsd_sah --classes subarachnoid
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segadapt.data import pair_cases_by_name, remap_label_file, write_dataset_json

SUBTYPES = {1: "epidural", 2: "intraparenchymal", 3: "intraventricular", 4: "subarachnoid", 5: "subdural"}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder holding images/ and 'ground truths/'")
    parser.add_argument("--out", type=Path, required=True, help="folder for dataset.json (and labelsTr/)")
    parser.add_argument("--classes", default="all", choices=["all", "any", *SUBTYPES.values()])
    parser.add_argument("--labels-dir", default="ground truths", help="label folder name under --root")
    args = parser.parse_args(argv)
    cases = pair_cases_by_name(args.root / "images", args.root / args.labels_dir, prefix="bhsd_")
    labels = {0: "background", **SUBTYPES}
    if args.classes != "all":
        mapping = None if args.classes == "any" else {k: 1 for k, v in SUBTYPES.items() if v == args.classes}
        for case in cases:
            target = args.out / "labelsTr" / f"{case['case_id']}.nii.gz"
            case["label"] = remap_label_file(case["label"], target, mapping)
        labels = {0: "background", 1: "haemorrhage" if args.classes == "any" else args.classes}
    path = write_dataset_json(args.out / "dataset.json", f"bhsd_{args.classes}", cases, labels, {0: "CT"},
                              reference="https://github.com/White65534/BHSD")
    print(f"wrote {path} ({len(cases)} cases)")
    return path


if __name__ == "__main__":
    main()
