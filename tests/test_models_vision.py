"""The ViT image encoder: shapes, position-embedding interpolation, feature layers, meta build."""

from __future__ import annotations

import pytest
import torch

import mm1.models  # noqa: F401  (fills the registries)
from mm1.config import VisionConfig
from mm1.models.registry import ENCODERS
from mm1.models.vision import ViT, interpolate_grid_embeddings, resize_position_embeddings
from mm1.registry import ConfigError


def tiny(**kw) -> VisionConfig:
    base = dict(image_size=32, patch_size=8, width=32, depth=3, heads=4, mlp_dim=64)
    return VisionConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_vit_is_registered_as_vit():
    assert ENCODERS.get("vit") is ViT


@pytest.mark.parametrize("use_cls", [False, True])
def test_forward_returns_patch_features_without_cls_for_any_divisible_size(use_cls):
    vit = ViT(tiny(use_cls=use_cls, pre_norm=use_cls)).eval()
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)
    assert vit(torch.randn(2, 3, 48, 64)).shape == (2, 6 * 8, 32)  # non-square, larger grid


def test_indivisible_image_size_is_rejected_with_the_patch_size():
    with pytest.raises(ValueError, match="patch size 8"):
        ViT(tiny())(torch.randn(1, 3, 30, 32))


def test_position_embeddings_are_the_parameter_itself_at_the_native_grid():
    vit = ViT(tiny(use_cls=True))
    assert vit.position_embeddings(4, 4) is vit.pos_embed
    same = resize_position_embeddings(vit.state_dict(), 32)
    torch.testing.assert_close(same["pos_embed"], vit.pos_embed.detach(), rtol=0, atol=1e-6)


def test_interpolation_keeps_cls_position_apart_and_resamples_the_grid():
    vit = ViT(tiny(use_cls=True))
    pos = vit.position_embeddings(6, 5)
    assert pos.shape == (1, 1 + 30, 32)
    torch.testing.assert_close(pos[:, :1], vit.pos_embed[:, :1])  # CLS position untouched
    # A field that is constant over the grid stays constant (bicubic weights sum to 1).
    const = torch.ones(1, 16, 3) * torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(interpolate_grid_embeddings(const, (4, 4), (7, 9)), torch.ones(1, 63, 3) * const[0, 0])


def test_load_time_resize_equals_run_time_interpolation():
    vit = ViT(tiny(use_cls=True, pre_norm=True)).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        runtime = vit(x)
        big = ViT(tiny(use_cls=True, pre_norm=True, image_size=48)).eval()
        big.load_state_dict(resize_position_embeddings(vit.state_dict(), 48))
        torch.testing.assert_close(big(x), runtime, rtol=1e-5, atol=1e-5)
        resize_position_embeddings(vit, 48)  # module in place
    assert vit.cfg.image_size == 48 and vit.pos_embed.shape == (1, 1 + 36, 32)
    assert vit.position_embeddings(6, 6) is vit.pos_embed


def test_a_checkpoint_for_another_resolution_loads_with_regridded_positions():
    small = ViT(tiny(use_cls=True, pre_norm=True)).eval()
    big = ViT(tiny(use_cls=True, pre_norm=True, image_size=64)).eval()
    big.load_state_dict(small.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(big(x), small(x), rtol=1e-5, atol=1e-5)


def test_state_dict_resize_finds_the_vit_under_any_prefix_and_leaves_other_pos_embeds():
    vit = ViT(tiny())
    sd = {f"vision.{k}": v for k, v in vit.state_dict().items()}
    sd["connector.pos_embed"] = torch.zeros(1, 16, 8)  # a connector's, no sibling patch_embed
    out = resize_position_embeddings(sd, 64)
    assert out["vision.pos_embed"].shape == (1, 64, 32)
    assert out["connector.pos_embed"].shape == (1, 16, 8)
    with pytest.raises(ValueError, match="no ViT `pos_embed`"):
        resize_position_embeddings({"lm.w": torch.zeros(1)}, 64)


def test_interpolated_positions_get_gradients_and_are_cached_only_without_them():
    vit = ViT(tiny())
    vit(torch.randn(1, 3, 48, 48)).sum().backward()
    assert vit.pos_embed.grad is not None and vit.pos_embed.grad.abs().sum() > 0
    assert not vit._pos_cache
    with torch.no_grad():
        first = vit.position_embeddings(6, 6)
        assert vit.position_embeddings(6, 6) is first  # cached
        vit.pos_embed.add_(1.0)  # an optimizer step bumps the version: cache must not go stale
        torch.testing.assert_close(vit.position_embeddings(6, 6), first + 1.0, rtol=0, atol=1e-5)


def test_feature_layer_minus_two_returns_the_penultimate_block_output_without_post_norm():
    full = ViT(tiny(post_norm=True)).eval()
    pen = ViT(tiny(post_norm=True, feature_layer=-2)).eval()
    assert len(pen.blocks) == 2 and pen.post_norm is None  # later parts are never built
    pen.load_state_dict({k: v for k, v in full.state_dict().items() if k in pen.state_dict()})
    seen = {}
    full.blocks[1].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full(x)
        torch.testing.assert_close(pen(x), seen["out"])


def test_feature_layer_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="feature_layer=-5"):
        ViT(tiny(feature_layer=-5))


@pytest.mark.parametrize("act", ["gelu", "quick_gelu", "gelu_tanh"])
def test_activation_checkpointing_gives_the_same_gradients(act):
    vit = ViT(tiny(act=act, depth=2))
    x = torch.randn(2, 3, 32, 32)
    vit(x).square().sum().backward()
    ref = [p.grad.clone() for p in vit.parameters()]
    vit.zero_grad()
    vit.grad_checkpointing = True
    vit(x).square().sum().backward()
    for r, p in zip(ref, vit.parameters()):
        torch.testing.assert_close(p.grad, r)


def test_builds_on_the_meta_device_with_the_same_parameter_count():
    cfg = tiny(use_cls=True, pre_norm=True, image_size=336, patch_size=14)
    with torch.device("meta"):
        meta = ViT(cfg)
    assert all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in ViT(cfg).parameters())
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    out = meta(torch.randn(1, 3, 28, 28))
    assert out.shape == (1, 4, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("std", [1.0, 0.02])
def test_position_embeddings_start_at_the_configured_scale(std):
    vit = ViT(tiny(width=64, image_size=64, pos_init_std=std))  # 64 positions x 64 channels
    pos = vit.pos_embed.detach()
    assert abs(float(pos.std()) - std) < 0.05 * std
    with torch.no_grad():
        content = vit.patch_embed(torch.randn(4, 3, 64, 64)).std()  # unit-variance pixels
    if std == 1.0:  # the default starts at the patch embeddings' own scale
        assert 0.5 < float(pos.std() / content) < 2.0


def test_position_init_scale_must_be_positive():
    from mm1.config import load_config, preset_path

    with pytest.raises(ConfigError, match="model.vision.pos_init_std"):
        load_config(preset_path("tiny"), ["model.vision.pos_init_std=0"])


@pytest.mark.parametrize("patch", [4, 8, 16])
def test_conv_stem_gives_the_patchify_grid_at_unit_scale(patch):
    cfg = tiny(patch_size=patch, image_size=4 * patch, stem="conv")
    vit = ViT(cfg)
    convs = [m for m in vit.patch_embed.convs if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == {4: 2, 8: 3, 16: 4}[patch]  # one stride-2 3x3 convolution per halving
    assert vit(torch.randn(2, 3, 4 * patch, 4 * patch)).shape == (2, 16, 32)
    assert vit(torch.randn(1, 3, 8 * patch, 4 * patch)).shape == (1, 32, 32)  # any multiple, like patchify
    with torch.no_grad():
        content = vit.embed_patches(torch.randn(8, 3, 4 * patch, 4 * patch)).std()
    assert 0.3 < float(content) < 3.0  # near the unit-variance positions it is added to


def test_stem_config_errors_name_the_key_and_the_fix():
    from mm1.models.vision import check_vit

    with pytest.raises(ConfigError, match="model.vision.stem='pixel'.*patch, conv"):
        check_vit(tiny(stem="pixel"))
    with pytest.raises(ConfigError, match="patch_size=12 must be a power of 2"):
        check_vit(tiny(stem="conv", patch_size=12, image_size=48))
    with pytest.raises(ConfigError, match="use stem=patch"):
        check_vit(tiny(stem="conv", hf_path="some/clip"))


def test_conv_stem_state_resizes_and_reloads_at_another_resolution():
    vit = ViT(tiny(stem="conv")).eval()
    x = torch.randn(2, 3, 48, 48)
    sd = {f"vision.{k}": v for k, v in vit.state_dict().items()}
    out = resize_position_embeddings(sd, 48)  # patch size 8 read off the stem's three convolutions
    assert out["vision.pos_embed"].shape == (1, 36, 32)
    big = ViT(tiny(stem="conv", image_size=48)).eval()
    big.load_state_dict({k[len("vision.") :]: v for k, v in out.items()})
    with torch.no_grad():
        torch.testing.assert_close(big(x), vit(x), rtol=1e-5, atol=1e-5)


def test_conv_stem_meta_build_materialises_with_finite_outputs():
    with torch.device("meta"):
        meta = ViT(tiny(stem="conv"))
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    convs = [m for m in meta.patch_embed.convs if isinstance(m, torch.nn.Conv2d)]
    assert all(bool((c.bias == 0).all()) and 0.1 < float(c.weight.detach().std()) < 1.0 for c in convs)
    assert torch.isfinite(meta(torch.randn(1, 3, 32, 32))).all()
