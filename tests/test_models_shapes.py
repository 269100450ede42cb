"""Output shapes of every model for several input sizes and channel counts (tiny configs)."""

from __future__ import annotations

import pytest
import torch

from segadapt.models import MODELS, build_model

TINY_UNET2D = dict(channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
TINY_VIT = dict(depth=1, embed_dim=32, num_heads=2)
TINY_SAM = dict(depth=2, embed_dim=32, num_heads=2, global_attn_indexes=[1], window_size=2, neck_chans=16)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize(("in_ch", "out_ch", "size"), [(1, 1, (32, 32)), (3, 2, (16, 24))])
def test_multiview_unet_slice_shapes(shared, in_ch, out_ch, size):
    net = build_model("multiview_unet", in_channels=in_ch, out_channels=out_ch, shared_weights=shared, **TINY_UNET2D)
    for view in ("axial", "coronal", "sagittal"):
        assert net(torch.randn(2, in_ch, *size), view=view).shape == (2, out_ch, *size)


@pytest.mark.parametrize("fusion", ["mean", "learned"])
@pytest.mark.parametrize("shape", [(16, 24, 12), (10, 13, 7)])  # the second needs padding in every view
def test_multiview_unet_volume_shapes(fusion, shape):
    net = build_model("multiview_unet", in_channels=2, out_channels=3, fusion=fusion, **TINY_UNET2D).eval()
    fused, views = net.predict_volume(torch.randn(2, 2, *shape), slice_batch_size=4, return_views=True)
    assert fused.shape == (2, 3, *shape)
    assert set(views) == {"axial", "coronal", "sagittal"}
    assert all(v.shape == (2, 3, *shape) for v in views.values())
    torch.testing.assert_close(fused.sum(dim=1), torch.ones(2, *shape))  # softmax probabilities


@pytest.mark.parametrize("shape", [(16, 16, 16), (32, 16, 48)])
def test_unet3d_shapes(shape):
    net = build_model("unet3d", in_channels=2, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    assert net(torch.randn(1, 2, *shape)).shape == (1, 3, *shape)


@pytest.mark.parametrize("shape", [(16, 16, 16), (32, 16, 24)])
def test_dynunet_shapes_and_deep_supervision(shape):
    net = build_model(
        "dynunet",
        out_channels=2,
        kernel_size=(3, 3, 3),
        strides=(1, 2, 2),
        filters=(4, 8, 16),
        deep_supervision=True,
        deep_supr_num=1,
    )
    x = torch.randn(1, 1, *shape)
    assert net.train()(x).shape == (1, 2, 2, *shape)  # (B, 1 + deep_supr_num, C, ...)
    assert net.eval()(x).shape == (1, 2, *shape)


@pytest.mark.parametrize(
    ("encoder", "kwargs", "in_ch", "img", "size"),
    [
        ("vit_tiny_patch16_224", TINY_VIT, 1, 64, (64, 64)),
        ("vit_tiny_patch16_224", dict(TINY_VIT, dynamic_img_size=True), 3, 64, (48, 80)),
        ("samvit_base_patch16", TINY_SAM, 3, 64, (64, 64)),
        ("samvit_base_patch16", TINY_SAM, 1, 64, (32, 48)),
        # patch 14 is not a power of two: 4 upsampling stages give 64 px, resized to 56
        ("vit_small_patch14_dinov2", TINY_VIT, 1, 56, (56, 56)),
    ],
)
def test_vit_seg_shapes(encoder, kwargs, in_ch, img, size):
    net = build_model(
        "vit_seg", encoder=encoder, in_channels=in_ch, out_channels=2, img_size=img, encoder_kwargs=kwargs
    )
    assert net(torch.randn(2, in_ch, *size)).shape == (2, 2, *size)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model 'unet4d'.*multiview_unet"):
        build_model("unet4d")
    assert set(MODELS) >= {"multiview_unet", "unet3d", "dynunet", "vit_seg"}
    net = build_model("multiview_unet", shared_weights=False, **TINY_UNET2D)
    with pytest.raises(ValueError, match="view is required"):
        net(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="unknown view 'transverse'"):
        net(torch.randn(1, 1, 16, 16), view="transverse")
    with pytest.raises(ValueError, match="not divisible"):
        net(torch.randn(1, 1, 18, 16), view="axial")
    with pytest.raises(ValueError, match="predict_volume"):
        net(torch.randn(1, 1, 16, 16, 16), view="axial")
    with pytest.raises(ValueError, match="unknown fusion"):
        build_model("multiview_unet", fusion="max")
    with pytest.raises(ValueError, match="decoder_channels"):
        build_model(
            "vit_seg", encoder="vit_tiny_patch16_224", img_size=32, encoder_kwargs=TINY_VIT, decoder_channels=(8,)
        )
