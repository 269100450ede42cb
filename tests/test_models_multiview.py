"""Multi-view UNet: volume prediction and fusion against slice-by-slice references computed here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segadapt.data import AXIS_VIEWS, SLICE_AXES
from segadapt.models import VIEWS, MultiViewUNet

TINY = dict(channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def reference_view(unet, volume, view, activation=torch.sigmoid):
    """Probabilities of one view: every slice through the 2D UNet on its own, restacked (B, C, X, Y, Z)."""
    with torch.no_grad():
        if view == "axial":  # slices along Z: (B, C, X, Y)
            return torch.stack([activation(unet(volume[:, :, :, :, z])) for z in range(volume.shape[4])], dim=4)
        if view == "coronal":  # slices along Y: (B, C, X, Z)
            return torch.stack([activation(unet(volume[:, :, :, y, :])) for y in range(volume.shape[3])], dim=3)
        return torch.stack([activation(unet(volume[:, :, x])) for x in range(volume.shape[2])], dim=2)  # (B, C, Y, Z)


@pytest.fixture(scope="module")
def volume():
    torch.manual_seed(0)
    return torch.randn(2, 1, 12, 16, 8)


@pytest.mark.parametrize("shared", [True, False])
def test_mean_fusion_equals_mean_of_slicewise_predictions(volume, shared):
    torch.manual_seed(1)
    net = MultiViewUNet(shared_weights=shared, fusion="mean", **TINY).eval()
    fused, views = net.predict_volume(volume, slice_batch_size=5, return_views=True)
    unets = {v: (net.unet if shared else net.unets[v]) for v in ("axial", "coronal", "sagittal")}
    refs = {v: reference_view(u, volume, v) for v, u in unets.items()}
    for v in refs:
        torch.testing.assert_close(views[v], refs[v], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused, (refs["axial"] + refs["coronal"] + refs["sagittal"]) / 3, rtol=1e-5, atol=1e-6)
    if not shared:  # three different networks really give three different predictions
        assert (refs["axial"] - refs["sagittal"]).abs().max() > 1e-4


def test_multiclass_mean_fusion_uses_softmax(volume):
    torch.manual_seed(2)
    net = MultiViewUNet(out_channels=3, **TINY).eval()
    fused = net.predict_volume(volume, slice_batch_size=64)
    softmax = lambda z: torch.softmax(z, dim=1)  # noqa: E731
    refs = [reference_view(net.unet, volume, v, softmax) for v in ("axial", "coronal", "sagittal")]
    torch.testing.assert_close(fused, sum(refs) / 3, rtol=1e-5, atol=1e-6)


def test_learned_fusion_starts_at_mean_logits_and_is_trainable(volume):
    torch.manual_seed(3)
    net = MultiViewUNet(fusion="learned", **TINY).eval()
    fused = net.predict_volume(volume, slice_batch_size=8)
    logit = lambda z: z  # noqa: E731
    mean_logits = sum(reference_view(net.unet, volume, v, logit) for v in ("axial", "coronal", "sagittal")) / 3
    torch.testing.assert_close(fused, torch.sigmoid(mean_logits), rtol=1e-5, atol=1e-6)
    fused.mean().backward()  # the fusion conv gets gradients, the UNet passes ran without
    assert net.fusion.weight.grad is not None and net.fusion.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.unet.parameters())


def test_non_divisible_volume_is_zero_padded_symmetrically_and_cropped():
    torch.manual_seed(4)
    net = MultiViewUNet(**TINY).eval()
    vol = torch.randn(1, 1, 6, 8, 8)  # axial slices (6, 8) -> padded to (8, 8): one zero row each side of X
    _, views = net.predict_volume(vol, return_views=True)
    with torch.no_grad():
        ref = torch.stack([torch.sigmoid(net.unet(F.pad(vol[..., z], (0, 0, 1, 1))))[:, :, 1:-1] for z in range(8)], 4)
    torch.testing.assert_close(views["axial"], ref, rtol=1e-5, atol=1e-6)


def test_mixed_view_batch_routes_each_slice_to_its_unet():
    torch.manual_seed(5)
    net = MultiViewUNet(shared_weights=False, **TINY)
    x = torch.randn(4, 1, 16, 16)
    views = ["sagittal", "axial", "sagittal", "coronal"]
    out = net(x, view=views)
    for i, v in enumerate(views):
        torch.testing.assert_close(out[i : i + 1], net.unets[v](x[i : i + 1]))
    with pytest.raises(ValueError, match="3 view names for a batch of 4"):
        net(x, view=views[:3])


def test_views_use_the_data_pipeline_axes():
    """One view -> axis mapping for the model and the slice sampler, and its inverse for 'view' values."""
    assert set(VIEWS) == set(SLICE_AXES) and all(AXIS_VIEWS[SLICE_AXES[v]] == v for v in VIEWS)
    assert sorted(AXIS_VIEWS) == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown view 'transverse'; valid views: axial, coronal, sagittal"):
        MultiViewUNet(**TINY)(torch.zeros(1, 1, 8, 8), view="transverse")
