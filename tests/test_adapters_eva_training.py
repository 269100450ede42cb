"""init="eva" chosen by the training config: SegAdaptModule.setup initialises the adapters from training batches."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file

from segadapt.adapters import adapted_layers, eva_pending
from segadapt.data import make_phantom_dataset
from segadapt.models import build_model
from segadapt.training import SegAdaptModule, SegDataModule

KWARGS = {"in_channels": 3, "out_channels": 1, "channels": [4, 8], "strides": [2], "num_res_units": 0}


def test_fit_with_eva_initialises_every_adapter_from_the_training_batches(tmp_path):
    torch.manual_seed(1)
    net = build_model("multiview_unet", **KWARGS)
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(base))
    dataset = make_phantom_dataset(tmp_path / "sah", domain="sah", n=4, shape=(32, 32, 16), spacing=(6.9, 6.9, 10.0))
    preprocess = {"windows": [[40, 80], [80, 200], [600, 2800]], "slice_size": [32, 32], "cache": "none"}
    datamodule = SegDataModule(str(dataset), fold=0, n_folds=2, preprocess=preprocess, batch_size=2)
    module = SegAdaptModule(model="multiview_unet", model_kwargs=KWARGS, base_checkpoint=str(base),
                            adapter={"method": "conv_lora", "rank": 2, "init": "eva"}, preset="all_conv")
    assert eva_pending(module.net)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    assert eva_pending(module.net) == []
    for name, layer in adapted_layers(module.net):
        a = layer.adapters["default"].lora_A.detach().double()
        # one Adam step moves A by ~lr; the rows started orthonormal (the top right-singular vectors)
        torch.testing.assert_close(a @ a.t(), torch.eye(2, dtype=torch.float64), rtol=0, atol=0.1, msg=name)
