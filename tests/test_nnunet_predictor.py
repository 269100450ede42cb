"""nnU-Net's own predictor on the folder ``segadapt export RUN --nnunet DIR`` writes (22.9).

``nnunetv2`` is a test-only dependency (extra ``nnunet-test``): 2.7.0 exactly, the last release whose pins allow
``dynamic-network-architectures`` 0.4.2 (2.8.x needs >= 0.4.4, which pins ``timm<1.0.23``). Its
``nnUNetPredictor.initialize_from_trained_model_folder`` reads plans.json, dataset.json and
``fold_0/checkpoint_final.pth`` with nnU-Net's own code and builds the network from the plans;
``predict_single_npy_array`` preprocesses (nnU-Net's reader, normalisation, crop) and predicts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (test-only extra: pip install -e '.[nnunet-test]')")
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO  # noqa: E402
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from nnunet_fixtures import PATCH, write_raw_dataset, write_results  # noqa: E402
from test_nnunet import _cfg  # noqa: E402

from segadapt.data.files import save_nifti  # noqa: E402
from segadapt.export.cli import main as export_main  # noqa: E402
from segadapt.inference import Predictor  # noqa: E402
from segadapt.training import load_run, train  # noqa: E402


def test_nnunet_s_predictor_reads_the_exported_folder_and_predicts_what_segadapt_predicts(tmp_path):
    """An adapted (two-step lora_c) nnU-Net run, exported with the command line, then:

    * nnU-Net's loader builds the plans' network with the checkpoint's weights: it computes the run's network
      exactly (the same logits);
    * nnU-Net's whole pipeline on a case (its two channel files, cut to one patch so that nnU-Net's tiling is one
      window) gives segadapt predict's probabilities within nnU-Net's float16 sums (``predicted_logits`` is a
      half tensor in ``_internal_predict_sliding_window_return_logits``; with its Gaussian weights, up to 10,
      the rounding reaches 0.1, so the window is unweighted here), and the same mask except on ties (p = 0.5).
    """
    results, network = write_results(tmp_path / "results")
    cfg = _cfg(tmp_path / "runs", {"results": results, "network": network,
                                   "dataset": write_raw_dataset(tmp_path / "raw")})
    train(cfg)
    run = Path(cfg["run_dir"])
    export_main([str(run), "--nnunet", str(tmp_path / "exported")])

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=False, use_mirroring=False,
                                device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(tmp_path / "exported"), use_folds=(0,),
                                                   checkpoint_name="checkpoint_final.pth")
    module, _ = load_run(run)
    x = torch.randn(1, 2, *PATCH, generator=torch.Generator().manual_seed(0))
    theirs = predictor.network
    theirs.load_state_dict(predictor.list_of_parameters[0])
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), module.net(x), atol=1e-5, rtol=1e-4)
        assert (module.net(x) - network.eval()(x)).abs().max() > 1e-4  # the adapted network, not the base

    files = []
    for channel in range(2):
        cut = nib.load(tmp_path / "raw" / "imagesTr" / f"toy_000_{channel:04d}.nii.gz").slicer[:PATCH[0], :PATCH[1], :PATCH[2]]
        files.append(save_nifti(tmp_path / f"case_{channel:04d}.nii.gz", np.asarray(cut.dataobj), cut.affine))
    image, properties = SimpleITKIO().read_images([str(f) for f in files])
    mask, probabilities = predictor.predict_single_npy_array(image, properties, None, None, True)
    stacked = save_nifti(tmp_path / "case.nii.gz", np.stack([np.asarray(nib.load(f).dataobj) for f in files], -1),
                         nib.load(files[0]).affine)  # segadapt reads the channels as one 4D file
    segadapt_predictor = Predictor.from_runs([run], device="cpu")
    segadapt_predictor.postprocessing = []  # nnU-Net's predictor runs none (the export writes no postprocessing.pkl)
    ours = segadapt_predictor.predict(stacked)
    # nnU-Net's arrays are SimpleITK's (z, y, x); segadapt's nibabel's (x, y, z)
    ours_probabilities, ours_mask = np.transpose(ours.probabilities, (0, 3, 2, 1)), ours.mask.transpose(2, 1, 0)
    assert probabilities.shape == ours_probabilities.shape
    np.testing.assert_allclose(probabilities, ours_probabilities, atol=2e-3)
    differ = mask != ours_mask
    assert 0 < ours_mask.mean() < 1 and differ.mean() < 0.01
    assert np.all(np.abs(ours_probabilities[1][differ] - 0.5) < 2e-3)  # only where the two classes tie
