"""Any Medical Segmentation Decathlon task (``TaskNN_Name`` folder) -> segadapt dataset.json.

Reads the task's own ``dataset.json`` (``training`` pairs under imagesTr/labelsTr), adds case ids and
rewrites the paths relative to ``--out``; the volumes stay where they are. Multi-modal tasks keep their
``modality`` list (one image channel each).

    python datasets/prepare_decathlon.py --root ~/data/Task09_Spleen --out data/spleen
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segadapt.data import load_dataset_json, write_dataset_json


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="the TaskNN_Name folder holding dataset.json")
    parser.add_argument("--out", type=Path, required=True, help="folder for the new dataset.json")
    args = parser.parse_args(argv)
    task = load_dataset_json(args.root / "dataset.json")  # validates the task's own file, derives case ids
    cases = [{"image": c.image, "label": c.label, "case_id": c.case_id, "patient_id": c.patient_id} for c in task.cases]
    path = write_dataset_json(args.out / "dataset.json", task.name, cases, task.labels, task.modality,
                              reference=f"Medical Segmentation Decathlon, {args.root.name}")
    print(f"wrote {path} ({len(cases)} cases)")
    return path


if __name__ == "__main__":
    main()
