"""A tiny nnU-Net v2 world built in the tests: a raw dataset (two channels, name -> int labels) and a
trained-model folder (plans.json in nnU-Net v2's schema, dataset.json, fold_0/checkpoint_final.pth with
nnU-Net's keys) holding a small PlainConvUNet with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

SHAPE = (20, 18, 16)
PATCH = [16, 16, 16]

# nnU-Net v2's plans schema (nnunetv2/experiment_planning/experiment_planners/default_experiment_planner.py)
ARCH_KWARGS = {
    "n_stages": 3,
    "features_per_stage": [4, 8, 16],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [2, 2, 2],
    "n_conv_per_stage_decoder": [2, 2],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}


def plans(normalization: str = "ZScoreNormalization", transpose=(0, 1, 2)) -> dict:
    return {
        "dataset_name": "Dataset901_Toy",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [16, 18, 20],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose),
        "transpose_backward": [int(i) for i in np.argsort(transpose)],
        "configurations": {
            "2d": {"data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor",
                   "batch_size": 12, "patch_size": [32, 32], "spacing": [1.0, 1.0]},
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": PATCH,
                "median_image_size_in_voxels": [16.0, 18.0, 20.0],
                "spacing": [1.0, 1.0, 1.0],
                "normalization_schemes": [normalization, normalization],
                "use_mask_for_norm": [False, False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": ARCH_KWARGS,
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            },
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 900.0, "mean": 100.0 + c, "median": 95.0, "min": -50.0, "percentile_00_5": -20.0,
                     "percentile_99_5": 400.0 + c, "std": 50.0 + c} for c in range(2)},
    }


DATASET = {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "lesion": 1},
           "numTraining": 6, "file_ending": ".nii.gz", "name": "Dataset901_Toy"}


def reference_network(deep_supervision: bool = False) -> PlainConvUNet:
    """The plans' network built directly (not through segadapt), as nnU-Net's get_network_from_plans does."""
    return PlainConvUNet(
        input_channels=2, num_classes=2, deep_supervision=deep_supervision,
        n_stages=3, features_per_stage=[4, 8, 16], conv_op=torch.nn.Conv3d, kernel_sizes=[[3, 3, 3]] * 3,
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 2],
        conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-05, "affine": True},
        dropout_op=None, dropout_op_kwargs=None, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def write_raw_dataset(root: Path, n: int = 6, seed: int = 0) -> Path:
    """imagesTr/<case>_0000/_0001.nii.gz + labelsTr/<case>.nii.gz + dataset.json (nnU-Net v2)."""
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    for i in range(n):
        centre = np.array(SHAPE) / 2 + rng.uniform(-3, 3, 3)
        label = (np.linalg.norm(grid - centre[:, None, None, None], axis=0) < 4 + i % 3).astype(np.uint8)
        for c in range(2):
            image = 100.0 + 50 * c + 300.0 * label * (1 + c) + rng.normal(0, 20, SHAPE)
            nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), root / "imagesTr" / f"toy_{i:03d}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"toy_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({**DATASET, "numTraining": n}, indent=2))
    return root / "dataset.json"


def write_results(folder: Path, seed: int = 0, **plan_changes) -> tuple[Path, PlainConvUNet]:
    """An nnU-Net trained-model folder with a random PlainConvUNet; returns (folder, that network)."""
    torch.manual_seed(seed)
    network = reference_network()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans(**plan_changes), indent=2))
    (folder / "dataset.json").write_text(json.dumps(DATASET, indent=2))
    checkpoint = {  # nnUNetTrainer.save_checkpoint's keys
        "network_weights": network.state_dict(),
        "optimizer_state": torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99).state_dict(),
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
                    "train_losses": [np.float32(-0.1)], "epoch_start_timestamps": [1.0]},
        "_best_ema": np.float64(0.5),
        "current_epoch": 1000,
        "init_args": {"plans": plans(**plan_changes), "configuration": "3d_fullres", "fold": 0,
                      "dataset_json": DATASET, "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    (folder / "fold_0").mkdir(exist_ok=True)
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder, network


if __name__ == "__main__":  # python tests/nnunet_fixtures.py OUT: the tiny world for the README's commands
    import sys

    out = Path(sys.argv[1])
    print(write_raw_dataset(out / "Dataset901_Toy"), write_results(out / "results")[0])
