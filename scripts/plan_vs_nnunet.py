"""segadapt's plan beside nnU-Net's own planner, for the same datasets: a markdown table.

For each ``NAME=DATASET_JSON`` (a segadapt dataset.json; ``NAME=DATASET_JSON:2d`` for 2D images):

* segadapt: ``segadapt plan DATASET_JSON --out PLANS/NAME/plan.json`` (kept when it exists);
* nnU-Net v2 (offline, CPU): the cases linked into ``NNUNET/nnUNet_raw/DatasetNNN_NAME`` in nnU-Net's raw
  format (``imagesTr/<case>_0000<ending>``, ``labelsTr/<case><ending>``, a v2 ``dataset.json``; an RGB PNG
  stays one file with channels R, G, B, as nnU-Net's natural-image reader wants), then nnU-Net's
  ``extract_fingerprints`` (``nnUNetv2_extract_fingerprint``) and ``plan_experiments`` with the default
  ``ExperimentPlanner`` (``nnUNetv2_plan_experiment``, 8 GB target) -> ``nnUNet_preprocessed/.../nnUNetPlans.json``
  (kept when it exists).

Rows: segadapt's 3D plan and its 2D slice plan beside nnU-Net's ``3d_fullres`` and ``2d`` configurations
(network stages and filters, strides, patch, batch, spacing, normalisation; nnU-Net's sizes reversed from its
z, y, x array order into segadapt's x, y, z where its plan transposes nothing). nnU-Net's schedule is not planned:
1000 epochs x 250 iterations for every dataset (``nnUNetTrainer``); segadapt's plan holds no step count today.

    python scripts/plan_vs_nnunet.py --plans /work/bench/plans --nnunet /work/bench/nnunet \\
        hippocampus_target=/work/bench/data/hippocampus/target/dataset.json drive=/work/bench/data/drive/dataset.json:2d
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from segadapt.cli import main as segadapt_main
from segadapt.data import load_dataset_json

FIRST_ID = 901  # nnU-Net dataset ids used here (901, 902, ... in the order given)
EPOCHS, ITERATIONS = 1000, 250  # nnUNetTrainer's fixed schedule


def nnunet_raw(dataset_json: Path, folder: Path) -> Path:
    """Link the cases of a segadapt dataset.json into nnU-Net's raw format under `folder`; returns it."""
    description = load_dataset_json(dataset_json)
    first = description.cases[0].images[0].name
    ending = next(e for e in (".nii.gz", ".nii", ".png", ".tif", ".mha", ".nrrd") if first.endswith(e))
    rgb = ending == ".png" and description.channels == 3 and len(description.cases[0].images) == 1
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for case in description.cases:
        links = {f"labelsTr/{case.case_id}{ending}": case.label}
        links.update({f"imagesTr/{case.case_id}_{c:04d}{ending}": image for c, image in enumerate(case.images)})
        for name, target in links.items():
            if not (folder / name).exists():
                (folder / name).symlink_to(Path(target).resolve())
    channels = {"0": "R", "1": "G", "2": "B"} if rgb else {str(k): v for k, v in description.modality.items()}
    labels = {name: value for value, name in sorted(description.labels.items())}
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": channels, "labels": labels, "numTraining": len(description.cases), "file_ending": ending,
        "name": description.name}, indent=1), encoding="utf-8")
    return folder


def nnunet_plans(name: str, dataset_json: Path, dataset_id: int, root: Path) -> dict:
    """nnU-Net's plans of the dataset (fingerprint + default planner), made once under `root`."""
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[key] = str(root / key)
    plans = root / "nnUNet_preprocessed" / f"Dataset{dataset_id:03d}_{name}" / "nnUNetPlans.json"
    if not plans.is_file():
        nnunet_raw(dataset_json, root / "nnUNet_raw" / f"Dataset{dataset_id:03d}_{name}")
        # imported here: nnunetv2.paths reads the environment variables at import
        from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

        extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True)
        plan_experiments([dataset_id])
    return json.loads(plans.read_text(encoding="utf-8"))


def segadapt_plan(dataset_json: Path, out: Path, two_d: bool) -> dict:
    """The plan of ``segadapt plan`` (made once)."""
    if not out.is_file():
        segadapt_main(["plan", str(dataset_json), "--out", str(out), *(["--spatial-dims", "2"] if two_d else [])])
    return json.loads(out.read_text(encoding="utf-8"))


def _fmt(values) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def segadapt_rows(name: str, plan: dict) -> list[list[str]]:
    """Table rows of segadapt's plan: the network of its spatial dims, and the 2D slice network of a 3D plan."""
    spacing = _fmt([round(s, 3) for s in plan["target_spacing"]]) + ("" if not plan["resample"] else " (resampled)")
    intensity = plan["intensity"]
    if plan.get("clip_range"):
        intensity += " clip " + ", ".join(f"[{lo:g}, {hi:g}]" for lo, hi in plan["clip_range"])
        intensity += "".join(f" mean {m:.4g} std {sd:.4g}" for m, sd in zip(plan["norm_mean"], plan["norm_std"]))
    strides = [_fmt(s) for s in plan["strides"]]
    main = [name, f"segadapt {plan['spatial_dims']}d", f"{len(plan['filters'])} stages {_fmt(plan['filters'])}",
            " ".join(strides), _fmt(plan["patch_size"]), str(plan["batch_size"]), spacing, intensity, "not planned"]
    rows = [main]
    if plan["spatial_dims"] == 3:
        rows.append([name, "segadapt 2d slices", f"{len(plan['slice_filters'])} stages {_fmt(plan['slice_filters'])}",
                     f"{plan['slice_pools']} poolings", _fmt(plan["slice_size"]), str(plan["slice_batch_size"]),
                     spacing, intensity, "not planned"])
    return rows


def _nnunet_norm(plans: dict, channel: int, scheme: str, mask: bool) -> str:
    """nnU-Net's normalisation of one channel; CT with its clip (the foreground's 0.5-99.5 percentiles), mean, std."""
    text = scheme.replace("Normalization", "") + (" (nonzero mask)" if mask else "")
    if scheme == "CTNormalization":
        props = plans["foreground_intensity_properties_per_channel"][str(channel)]
        text += (f" clip [{props['percentile_00_5']:g}, {props['percentile_99_5']:g}]"
                 f" mean {props['mean']:.4g} std {props['std']:.4g}")
    return text


def nnunet_rows(name: str, plans: dict) -> list[list[str]]:
    """Table rows of nnU-Net's configurations (2d, 3d_lowres, 3d_fullres; the cascade has no values of its own)."""
    rows = []
    # nnU-Net's sizes are in its array order (SimpleITK / image rows: z, y, x) after ``transpose_forward``; with
    # no transpose they are reversed here into segadapt's x, y, z (the 2d configuration: the last two axes)
    identity = plans["transpose_forward"] == sorted(plans["transpose_forward"])
    order = (lambda v: list(v)[::-1]) if identity else (lambda v: list(v))  # noqa: E731
    for config in ("3d_fullres", "3d_lowres", "2d"):
        c = plans["configurations"].get(config)
        if c is None or "architecture" not in c:
            continue
        arch = c["architecture"]["arch_kwargs"]
        norms = ", ".join(_nnunet_norm(plans, channel, scheme, mask) for channel, (scheme, mask)
                          in enumerate(zip(c["normalization_schemes"], c["use_mask_for_norm"])))
        axes = "" if identity else f" (transpose_forward {plans['transpose_forward']})"
        rows.append([name, f"nnU-Net {config}{axes}", f"{arch['n_stages']} stages {_fmt(arch['features_per_stage'])}",
                     " ".join(_fmt(order(s)) for s in arch["strides"]), _fmt(order(c["patch_size"])), str(c["batch_size"]),
                     _fmt(order([round(s, 3) for s in c["spacing"]])), norms, f"{EPOCHS}x{ITERATIONS} = {EPOCHS * ITERATIONS}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="+", help="NAME=DATASET_JSON or NAME=DATASET_JSON:2d")
    parser.add_argument("--plans", type=Path, required=True, help="folder for segadapt's NAME/plan.json")
    parser.add_argument("--nnunet", type=Path, required=True, help="folder for nnUNet_raw / _preprocessed / _results")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    header = ["dataset", "planner", "network", "strides", "patch", "batch", "spacing (mm)", "intensity", "steps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, item in enumerate(args.datasets):
        name, _, path = item.partition("=")
        two_d = path.endswith(":2d")
        dataset_json = Path(path.removesuffix(":2d"))
        rows = segadapt_rows(name, segadapt_plan(dataset_json, args.plans / name / "plan.json", two_d))
        rows += nnunet_rows(name, nnunet_plans(name, dataset_json, FIRST_ID + i, args.nnunet))
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
