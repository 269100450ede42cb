"""A run as a MONAI bundle: the merged network with the run's preprocessing, sliding window and postprocessing.

:func:`export_bundle` writes::

    <folder>/configs/inference.json   network_def, preprocessing, inferer, postprocessing, initialize, run
    <folder>/configs/metadata.json    MONAI's metadata (versions, network_data_format with value ranges)
    <folder>/configs/logging.conf     MONAI model zoo's logging configuration
    <folder>/models/model.pt          state dict of the merged plain network (adapters folded in)

and ``python -m monai.bundle run --config_file <folder>/configs/inference.json --dataset_dir DIR`` (or
``--datalist "['scan.nii.gz']"``; ``--output_dir`` defaults to ``<bundle_root>/eval``), from any working
folder, writes one ``<name>_seg.nii.gz`` mask per NIfTI scan, on the scan's grid, as ``segadapt predict`` does.
``bundle_root`` is the folder the bundle was written to (absolute); after moving the folder, give
``--bundle_root NEW_DIR``.

Networks: every run with an adapter (merged) or tuned in full (``full`` / ``decoder`` / ``scratch``:
its ``model.safetensors``). ``dynunet`` and ``unet3d`` are plain MONAI classes (``DynUNet``, ``UNet``) with
their keyword arguments; segadapt's own networks (``multiview_unet``, ``vit_seg``, ``sam``) are built by
``segadapt.models.build_model`` (the multi-view UNet predicts with its own fused volume prediction);
``nnunet`` runs are refused (``segadapt export --nnunet``). The preprocessing is the run's preprocessing spec
(:func:`segadapt.data.pipelines.preprocessing_spec` of its ``datamodule.preprocess``, the entries training and
``segadapt predict`` instantiate) -- orientation, spacing, the foreground crop and the intensity step -- which
names segadapt's transform classes only where MONAI has none (several CT windows stacked as channels, several
clipped z-score channels, a z-score that leaves a background value out); a bundle that names segadapt (those, or
its network classes) needs segadapt installed (listed in the metadata). The bundle runs its cases in a plain loop
(``run``), not MONAI's ``SupervisedEvaluator``, so it needs no pytorch-ignite.

The run's postprocessing choice (metrics.json ``postprocessing``: the largest connected component of a class)
is ``KeepLargestConnectedComponentd`` after ``AsDiscreted``. The bundle does not mirror at test time (its
``run`` calls the inferer once), so it matches ``segadapt predict`` of a run without ``tta``.

One thresholding detail: the bundle's ``AsDiscreted(threshold=t)`` keeps p >= t, ``segadapt predict`` p > t;
they differ only on voxels whose probability is exactly t.
"""

from __future__ import annotations

import inspect
import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from torch import nn

import segadapt
from segadapt.data import PreprocessConfig, preprocessing_spec
from segadapt.io import atomic_path, check_output_folder, write_json
from segadapt.export.common import check_targets, load_run_for_export
from segadapt.models import MODELS, logits_to_probabilities, model_spec
from segadapt.models.registry import SEGADAPT_BUILDER
from segadapt.runs import FINGERPRINT_FILE, open_run
from segadapt.training.postprocessing import chosen_classes, recorded_postprocessing

WEIGHT_FILE_KWARGS = ("checkpoint", "encoder_weights")  # builder arguments naming pretrained files (SAM, ViT)
INFERENCE_CONFIG = Path("configs") / "inference.json"
METADATA = Path("configs") / "metadata.json"
MODEL_FILE = Path("models") / "model.pt"
LOGGING_CONFIG = Path("configs") / "logging.conf"
BUNDLE_FILES = (INFERENCE_CONFIG, METADATA, LOGGING_CONFIG, MODEL_FILE)
# MONAI model zoo's logging.conf (``python -m monai.bundle run`` applies configs/logging.conf when present)
LOGGING = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""
META_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"


def network_def(model: str, model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The bundle's ``network_def`` (the model's ``bundle_network``, :class:`segadapt.models.ModelSpec`): a plain
    MONAI class (``dynunet``, ``unet3d``) with the keyword arguments that segadapt's builder gives it, defaults
    filled in; segadapt's own networks (``multiview_unet``, ``vit_seg``, ``sam``) through
    ``segadapt.models.build_model``.

    Raises:
        ValueError: `model` cannot be rebuilt from the bundle alone (``nnunet``: its plans folder; use --nnunet).
    """
    spec = model_spec(model)
    if spec.bundle_network == SEGADAPT_BUILDER:
        kwargs = {k: v for k, v in model_kwargs.items() if k not in WEIGHT_FILE_KWARGS}  # the weights: model.pt
        return {"_target_": SEGADAPT_BUILDER, "name": model, **json.loads(json.dumps(kwargs))}
    if spec.bundle_network is None:
        supported = [name for name, other in MODELS.items() if other.bundle_network is not None]
        raise ValueError(f"model {model!r} cannot be a MONAI bundle; bundles support {', '.join(supported)} (use the "
                         "merged export instead, or --nnunet for model=nnunet)")
    arguments = inspect.signature(spec.build).bind(**model_kwargs)
    arguments.apply_defaults()
    kwargs = dict(arguments.arguments)
    if spec.bundle_kwargs is not None:
        kwargs = spec.bundle_kwargs(kwargs)
    return {"_target_": spec.bundle_network, **json.loads(json.dumps(kwargs))}


def _image_channels(config: Mapping[str, Any], preprocess: PreprocessConfig) -> int:
    """Image channels before windowing (as :class:`segadapt.inference.predictor.Predictor` counts them)."""
    in_channels = int(config["module"].get("model_kwargs", {}).get("in_channels", preprocess.in_channels))
    return max(in_channels // preprocess.in_channels, 1)


def preprocessing(cfg: PreprocessConfig, channels: int) -> dict[str, Any]:
    """The run's inference preprocessing as the bundle's ``preprocessing``: the one preprocessing spec of
    training and ``segadapt predict`` (:func:`segadapt.data.pipelines.preprocessing_spec`), read by MONAI's
    ``LoadImaged`` and without segadapt's case checks (``LoadCased``'s header and shape checks,
    ``RequireForegroundd``)."""
    return {"_target_": "Compose", "transforms": preprocessing_spec(cfg, ("image",), None, channels, checked=False)}


def _inferer(module: Mapping[str, Any], cfg: PreprocessConfig) -> Any:
    """SegAdaptModule.predict_probabilities as the bundle's ``inferer`` (image, network) -> logits, or the
    multi-view UNet's fused probabilities (its own volume prediction)."""
    if model_spec(module["model"]).multi_view:
        return f"$lambda image, net: net.predict_volume(image, slice_batch_size={int(module.get('slice_batch_size', 32))})"
    roi = module.get("roi_size")
    if roi is None:
        raise ValueError("the run has no module.roi_size: a bundle's sliding-window inferer needs one")
    window = {"roi_size": list(roi), "sw_batch_size": int(module.get("sw_batch_size", 1)),
              "overlap": float(module.get("overlap", 0.25)), "mode": "gaussian"}
    if len(roi) == cfg.spatial_dims - 1:  # a 2D network slice by slice along the axial axis (SegAdaptModule)
        return {"_target_": "SliceInferer", "spatial_dim": 2, **window}
    return {"_target_": "SlidingWindowInferer", **window}


def inference_config(config: Mapping[str, Any], bundle_root: str | os.PathLike = ".",
                     largest_component: Sequence[bool] = ()) -> dict[str, Any]:
    """The bundle's ``inference.json`` for a run config (``config.yaml`` of a run folder); `largest_component`
    (per foreground class, the run's chosen postprocessing) adds ``KeepLargestConnectedComponentd``.

    `bundle_root` is the bundle's folder (absolute, so that MONAI's command works from any working folder;
    ``--bundle_root DIR`` overrides it, e.g. after moving the folder). ``imports`` names segadapt only where
    the network or a transform is segadapt's.
    """
    module = config["module"]
    network = network_def(module["model"], module.get("model_kwargs") or {})
    cfg = PreprocessConfig.from_dict(dict(config["datamodule"]["preprocess"]))
    channels = _image_channels(config, cfg)
    inferer = _inferer(module, cfg)
    out_channels = int(module.get("model_kwargs", {}).get("out_channels", 1))
    threshold = float(module.get("threshold", 0.5))
    activation = [] if model_spec(module["model"]).multi_view else [  # the multi-view UNet gives probabilities
        {"_target_": "Activationsd", "keys": "pred", **({"sigmoid": True} if out_channels == 1 else {"softmax": True})}]
    discrete = {"threshold": "@threshold"} if out_channels == 1 else {"argmax": True}
    pipeline = preprocessing(cfg, channels)
    uses_segadapt = "segadapt." in json.dumps([network, pipeline])
    return {
        "imports": ["$import glob", "$import numpy", "$import torch"] + (["$import segadapt"] if uses_segadapt else []),
        "bundle_root": str(bundle_root),
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist": "$sorted(glob.glob(@dataset_dir + '/*.nii*'))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "threshold": threshold,
        "network_def": network,
        "network": "$@network_def.to(@device)",
        "preprocessing": pipeline,
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": [
            *activation,
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", **discrete},
            *_keep_largest(largest_component),
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8", "separate_folder": False, "resample": False},
        ]},
        "checkpoint": "$torch.load(@bundle_root + '/models/model.pt', map_location=@device, weights_only=True)",
        "initialize": ["$@network.load_state_dict(@checkpoint)", "$@network.eval()", "$torch.set_grad_enabled(False)"],
        "run": ["$[@postprocessing({**item, 'pred': @inferer(item['image'][None].to(@device), @network)[0].float()})"
                " for item in @dataset]"],
        # set_grad_enabled is process-wide: give it back, so `monai.bundle.run` called from Python leaves autograd on
        "finalize": ["$torch.set_grad_enabled(True)"],
    }


def _keep_largest(largest_component: Sequence[bool]) -> list[dict[str, Any]]:
    """The run's postprocessing as MONAI's transform on the label map (none when no class keeps its largest component)."""
    classes = chosen_classes(largest_component)
    if not classes:
        return []
    return [{"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": classes,
             "is_onehot": False, "independent": True}]


def metadata(config: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """The bundle's ``metadata.json`` (MONAI's fields; the run's identity in the description)."""
    import monai

    module, run = config["module"], config.get("run", {})
    cfg = PreprocessConfig.from_dict(dict(config["datamodule"]["preprocess"]))
    in_channels = int(module.get("model_kwargs", {}).get("in_channels", cfg.in_channels))
    out_channels = int(module.get("model_kwargs", {}).get("out_channels", 1))
    roi = module.get("roi_size")  # None: the multi-view UNet takes whole volumes
    shape = list(roi) if roi is not None else ["*"] * cfg.spatial_dims
    tensor = {"type": "image", "spatial_shape": shape, "dtype": "float32", "is_patch_data": roi is not None}
    classes = {"0": "lesion"} if out_channels == 1 else {str(c): f"class {c}" for c in range(out_channels)}
    return {
        "schema": META_SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by segadapt {segadapt.__version__} from {run_dir}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": _version("nibabel"), "segadapt": segadapt.__version__},
        "task": f"{run.get('dataset', 'lesion')} segmentation",
        "description": (f"{module['model']} adapted with {run.get('method', module.get('adapter'))} "
                        f"(fold {run.get('fold', '?')} of experiment {run.get('experiment', '?')}), adapter merged"),
        "authors": "segadapt",
        "copyright": "see the training data's licence",
        "intended_use": "research; not for diagnostic use",
        "data_type": "nibabel",
        "image_classes": f"{in_channels} channel(s) after segadapt's '{cfg.intensity}' intensity step",
        "pred_classes": ("1 channel: foreground probability (sigmoid), thresholded at "
                         f"{module.get('threshold', 0.5)}" if out_channels == 1 else f"{out_channels} classes (softmax, argmax)"),
        "network_data_format": {
            "inputs": {"image": {**tensor, "format": "hounsfield" if cfg.intensity.startswith("ct") else "magnitude",
                                 "num_channels": in_channels, "value_range": input_range(cfg, run_dir),
                                 "channel_def": {str(c): "image" for c in range(in_channels)}}},
            "outputs": {"pred": {**tensor, "format": "segmentation", "num_channels": out_channels,
                                 "value_range": [0, max(out_channels - 1, 1)], "channel_def": classes}},
        },
        "platform": platform.platform(),
    }


def input_range(cfg: PreprocessConfig, run_dir: Path) -> list[float]:
    """The scan intensities the network distinguishes: the span of the CT windows / clip ranges (HU beyond
    it are clipped), 0..255 for 8-bit images, else the training images' range (the run's fingerprint.json)."""
    if cfg.intensity == "ct":
        return [min(lv - w / 2 for lv, w in cfg.windows), max(lv + w / 2 for lv, w in cfg.windows)]
    if cfg.intensity == "ct_zscore":
        return [min(low for low, _ in cfg.clip_range), max(high for _, high in cfg.clip_range)]
    if cfg.intensity not in ("mri", "zscore"):
        return [0.0, 255.0]
    fingerprint = run_dir / FINGERPRINT_FILE
    cases = json.loads(fingerprint.read_text(encoding="utf-8")).get("cases", []) if fingerprint.is_file() else []
    stats = [s for case in cases for s in case.get("image_intensity", [])]
    return [min(s["min"] for s in stats), max(s["max"] for s in stats)] if stats else []


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _check_network(net: nn.Module, definition: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                   roi: list[int], in_channels: int) -> None:
    """Refuse a bundle whose network_def does not compute what the merged network computes (a builder
    argument the mapping missed would make it silently wrong)."""
    plain = ConfigParser({"network_def": dict(definition)}).get_parsed_content("network_def")
    plain.load_state_dict(state)
    if definition["_target_"] == SEGADAPT_BUILDER:  # segadapt's own builder: the same class, loaded strictly
        return
    x = torch.randn(1, in_channels, *roi, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = net.eval()(x), plain.eval()(x)
    if ours.shape != theirs.shape or not torch.allclose(logits_to_probabilities(ours), logits_to_probabilities(theirs),
                                                         atol=1e-5):
        raise ValueError(f"the bundle's network_def {definition['_target_']} does not reproduce the run's network")


def export_bundle(run_dir: str | os.PathLike, folder: str | os.PathLike, strict: bool = True, force: bool = False) -> Path:
    """Write the run folder `run_dir` as a MONAI bundle in `folder` (see the module docstring); returns `folder`.

    Raises:
        ValueError: a network without a plain MONAI class, a run without ``roi_size``, an output folder
            that exists and is not empty.
        FileNotFoundError: no run (config.yaml and adapter.safetensors) in `run_dir`.
    """
    from segadapt.adapters import merge_and_unload

    run_dir, folder = Path(run_dir), Path(folder)
    check_output_folder(folder, "bundle folder")
    config = open_run(run_dir)
    check_targets(run_dir, config, [folder / f for f in BUNDLE_FILES], force=force)
    # refuses a network it cannot build before any work
    inference = inference_config(config, folder.resolve(), recorded_postprocessing([run_dir]))
    net, _ = load_run_for_export(run_dir, strict=strict)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in merge_and_unload(net).state_dict().items()}
    in_channels = int(config["module"].get("model_kwargs", {}).get("in_channels", 1))
    _check_network(net, inference["network_def"], state, list(config["module"].get("roi_size") or []), in_channels)
    with atomic_path(folder / MODEL_FILE) as tmp:
        torch.save(state, tmp)
    with atomic_path(folder / LOGGING_CONFIG) as tmp:
        tmp.write_text(LOGGING, encoding="utf-8")
    write_json(folder / METADATA, metadata(config, run_dir.resolve()))
    write_json(folder / INFERENCE_CONFIG, inference)
    return folder
