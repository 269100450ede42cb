"""nnU-Net v2 plans <-> segadapt's :class:`~segadapt.plan.planner.Plan`.

:func:`plan_from_nnunet` turns the plans of a trained-model folder (:class:`segadapt.models.nnunet.NnUNetModel`)
into segadapt's Plan, so the one planning path sets the preprocessing the network was trained with;
:func:`nnunet_plans` is the inverse (``python -m segadapt.plan.nnunet DATASET_JSON OUT_DIR`` writes the plans of
a PlainConvUNet on a dataset's segadapt plan).

Axes: nnU-Net reads an image as SimpleITK does (array axes = the file's voxel axes reversed) and then
transposes by ``transpose_forward``; it never reorients. segadapt reorients every case to one axis code
string, chosen here as the one nnU-Net's network sees for the dataset's first case (its file axes
reversed, then transposed), so the network sees the axes it was trained on. Cases stored in another
orientation are reoriented to it (nnU-Net would feed them as stored).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib

from segadapt.data.dataset_json import load_dataset_json
from segadapt.plan.planner import Plan, load_or_make_plan
from segadapt.data.readers import sitk_affine
from segadapt.errors import exits_on_user_error
from segadapt.io import write_json
from segadapt.models.nnunet import DATASET_FILE, PLANS_FILE, NnUNetModel
from segadapt.parsers import nnunet_plans_parser

# nnU-Net's normalisation scheme -> segadapt's intensity mode ('zscore' / 'mri': see _intensity)
NORMALIZATION = {"CTNormalization": "ct_zscore", "ZScoreNormalization": "zscore", "RGBTo01Normalization": "rgb"}


def file_axcodes(path: str | os.PathLike) -> tuple[str, ...]:
    """Axis codes of an image file's voxel axes (nibabel's ``aff2axcodes``), read from its header only."""
    path = str(path)
    if path.lower().endswith((".nii", ".nii.gz")):
        affine = nib.load(path).affine
    else:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        image = sitk.Image([1] * reader.GetDimension(), sitk.sitkUInt8)
        image.SetDirection(reader.GetDirection())
        image.SetSpacing(reader.GetSpacing())
        image.SetOrigin(reader.GetOrigin())
        affine = sitk_affine(image)
    return tuple(nib.aff2axcodes(affine))


_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


def network_orientation(axcodes: Sequence[str], transpose_forward: Sequence[int]) -> str:
    """Axis codes of the array nnU-Net's network sees for a file with voxel axes `axcodes`:
    SimpleITK's array reverses the voxel axes, then ``transpose_forward`` permutes them."""
    reversed_codes = list(axcodes)[::-1]
    return "".join(reversed_codes[int(t)] for t in transpose_forward)


def transpose_for(axcodes: Sequence[str], orientation: str) -> list[int]:
    """``transpose_forward`` that gives nnU-Net's network the axes of `orientation` for a file with voxel
    axes `axcodes` (axes matched by anatomy; a flipped axis stays flipped: nnU-Net does not flip)."""
    reversed_codes = list(axcodes)[::-1]
    order = []
    for code in orientation:
        match = [i for i, c in enumerate(reversed_codes) if c in (code, _OPPOSITE[code])]
        if len(match) != 1:
            raise ValueError(f"cannot map file axes {tuple(axcodes)} onto orientation {orientation!r}")
        order.append(match[0])
    return order


def _intensity(model: NnUNetModel) -> dict[str, Any]:
    """segadapt intensity fields for the configuration's ``normalization_schemes`` (one scheme for all channels):
    CTNormalization -> 'ct_zscore' with the plans' foreground statistics per channel; ZScoreNormalization ->
    'mri' (z-score over nonzero voxels) when ``use_mask_for_norm``, else 'zscore' over the whole volume;
    RGBTo01Normalization -> 'rgb'."""
    config, where = model.config, model.folder / PLANS_FILE
    schemes = list(config.get("normalization_schemes") or [])
    if len(schemes) != model.in_channels:
        raise ValueError(f"{where}: {len(schemes)} normalization_schemes for {model.in_channels} channel(s)")
    if len(set(schemes)) != 1 or schemes[0] not in NORMALIZATION:
        raise ValueError(f"{where}: normalization_schemes {schemes}: segadapt applies one of {sorted(NORMALIZATION)} "
                         "to every channel")
    intensity = NORMALIZATION[schemes[0]]
    masked = list(config.get("use_mask_for_norm") or [False] * len(schemes))
    if intensity == "zscore":
        return {"intensity": "mri"} if all(masked) else {"intensity": "zscore", "background_value": [None] * len(schemes)}
    if intensity == "ct_zscore":
        stats = model.plans.get("foreground_intensity_properties_per_channel") or {}
        try:
            per_channel = [stats[str(c)] for c in range(len(schemes))]
            return {"intensity": "ct_zscore",
                    "clip_range": [[float(s["percentile_00_5"]), float(s["percentile_99_5"])] for s in per_channel],
                    "norm_mean": [float(s["mean"]) for s in per_channel],
                    "norm_std": [float(s["std"]) for s in per_channel]}
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: CTNormalization needs foreground_intensity_properties_per_channel with "
                             f"mean, std, percentile_00_5, percentile_99_5 per channel ({e!r} missing)") from None
    return {"intensity": intensity}


def plan_from_nnunet(model: NnUNetModel, dataset_json: str | os.PathLike) -> Plan:
    """segadapt's :class:`~segadapt.plan.planner.Plan` from an nnU-Net configuration: its spacing (always
    resampled to), patch size, batch size, normalisation and statistics, network stages, and the orientation
    nnU-Net's network sees for the first case of `dataset_json` (the data the run reads)."""
    config = model.config
    arch = config["architecture"]["arch_kwargs"]
    description = load_dataset_json(dataset_json)
    first = description.cases[0].images[0]
    transpose = model.plans.get("transpose_forward", [0, 1, 2])
    orientation = network_orientation(file_axcodes(first), transpose)
    strides = [[int(s)] * 3 if isinstance(s, int) else [int(v) for v in s] for s in arch.get("strides", [])]
    kernels = [[int(k)] * 3 if isinstance(k, int) else [int(v) for v in k] for k in arch.get("kernel_sizes", [])]
    patch = [int(p) for p in config["patch_size"]]
    pools = [sum(1 for s in strides if s[axis] > 1) for axis in range(3)]
    features = arch.get("features_per_stage", [])
    features = [int(features)] * len(strides) if isinstance(features, int) else [int(f) for f in features]
    notes = [f"from nnU-Net plans {model.folder / PLANS_FILE}, configuration {model.configuration!r} "
             f"({config['architecture']['network_class_name'].rsplit('.', 1)[-1]}); orientation {orientation} = "
             f"the axes nnU-Net's network sees for {first.name} (transpose_forward {list(transpose)})"]
    return Plan(
        dataset=str(model.plans.get("dataset_name", model.folder.name)), n_cases=int(model.dataset.get("numTraining", 0)),
        modality={str(k): str(v) for k, v in model.dataset.get("channel_names", {}).items()}, spatial_dims=3,
        orientation=orientation,
        median_spacing=[float(s) for s in model.plans.get("original_median_spacing_after_transp", config["spacing"])],
        target_spacing=[float(s) for s in config["spacing"]], resample=True, anisotropic_axis=None,
        median_shape=[int(round(float(s))) for s in config.get("median_image_size_in_voxels", patch)],
        patch_size=patch, pools_per_axis=pools, strides=strides, kernel_sizes=kernels, filters=features,
        batch_size=int(config.get("batch_size", 2)), slice_size=patch[1:], slice_pools=0, slice_filters=[],
        slice_batch_size=int(config.get("batch_size", 2)),
        networks={"nnunet": {"out_channels": model.num_classes}}, notes=notes, **_intensity(model),
    )


# ---- segadapt Plan -> nnU-Net plans ---------------------------------------------------------------------
_SCHEMES = {"ct_zscore": "CTNormalization", "zscore": "ZScoreNormalization", "mri": "ZScoreNormalization",
            "rgb": "RGBTo01Normalization"}


def nnunet_plans(plan: Plan, dataset_json: str | os.PathLike, features: Sequence[int] | None = None,
                 configuration: str = "3d_fullres", n_conv_per_stage: int = 2) -> tuple[dict, dict]:
    """(plans.json, dataset.json) of an nnU-Net trained-model folder for a PlainConvUNet on segadapt's `plan`
    (its spacing, patch, batch, stages, normalisation and orientation): the inverse of :func:`plan_from_nnunet`,
    so a network segadapt trains on this plan is an nnU-Net network of these plans. `features` per stage
    default to the plan's filters. ``transpose_forward`` maps the file axes of the first case of
    `dataset_json` onto the plan's orientation.
    """
    if plan.intensity not in _SCHEMES:
        raise ValueError(f"intensity {plan.intensity!r} has no nnU-Net normalisation scheme ({sorted(_SCHEMES)})")
    description = load_dataset_json(dataset_json)
    channels = description.channels
    transpose = transpose_for(file_axcodes(description.cases[0].images[0]), plan.orientation)
    features = [int(f) for f in (features or plan.filters)]
    stages = len(plan.strides)
    if len(features) != stages:
        raise ValueError(f"{len(features)} features for {stages} stages")
    stats = {}
    if plan.intensity == "ct_zscore":
        stats = {str(c): {"mean": plan.norm_mean[c], "std": plan.norm_std[c], "percentile_00_5": plan.clip_range[c][0],
                          "percentile_99_5": plan.clip_range[c][1]} for c in range(channels)}
    plans = {
        "dataset_name": description.name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(plan.median_spacing),
        "original_median_shape_after_transp": list(plan.median_shape),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": transpose,
        "transpose_backward": [transpose.index(i) for i in range(len(transpose))],
        "configurations": {configuration: {
            "data_identifier": f"nnUNetPlans_{configuration}",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": int(plan.batch_size),
            "patch_size": list(plan.patch_size),
            "median_image_size_in_voxels": [float(s) for s in plan.median_shape],
            "spacing": list(plan.target_spacing),
            "normalization_schemes": [_SCHEMES[plan.intensity]] * channels,
            "use_mask_for_norm": [plan.intensity == "mri"] * channels,
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": stages, "features_per_stage": features, "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [list(k) for k in plan.kernel_sizes], "strides": [list(s) for s in plan.strides],
                    "n_conv_per_stage": [n_conv_per_stage] * stages,
                    "n_conv_per_stage_decoder": [n_conv_per_stage] * (stages - 1), "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
                },
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
            },
            "batch_dice": True,
        }},
        "experiment_planner_used": "segadapt",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": stats,
    }
    dataset = {"channel_names": {str(k): v for k, v in description.modality.items()},
               "labels": {name: int(value) for value, name in sorted(description.labels.items())},
               "numTraining": len(description.cases), "file_ending": description.file_ending or ".nii.gz",
               "name": description.name}
    return plans, dataset


def write_plans(out_dir: str | os.PathLike, plans: Mapping, dataset: Mapping) -> Path:
    """plans.json + dataset.json of a trained-model folder (no checkpoint yet: ``adapter=scratch`` trains one)."""
    out_dir = Path(out_dir)
    write_json(out_dir / PLANS_FILE, dict(plans))
    write_json(out_dir / DATASET_FILE, dict(dataset))
    return out_dir


@exits_on_user_error
def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m segadapt.plan.nnunet DATASET_JSON OUT_DIR``: plans.json + dataset.json of a PlainConvUNet
    on the dataset's segadapt plan (a folder ``model=nnunet adapter=scratch`` pretrains); bad input: one
    ``error:`` line, exit code 2."""
    args = nnunet_plans_parser().parse_args(argv)
    plan = load_or_make_plan(args.dataset_json, args.cache_dir)
    for name, value in (("patch_size", args.patch_size), ("intensity", args.intensity), ("batch_size", args.batch_size)):
        if value is not None:
            setattr(plan, name, list(value) if isinstance(value, list) else value)
    plans, dataset = nnunet_plans(plan, args.dataset_json, args.features)
    out = write_plans(args.out_dir, plans, dataset)
    features = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"]
    print(f"nnU-Net plans ({plan.dataset}, PlainConvUNet {features}) -> {out}")
    return out


if __name__ == "__main__":
    main()
