"""Loading HF CLIP / SigLIP vision towers: exact features, strict keys, resolution changes.

transformers is the reference here (test-only); tiny random towers are saved to tmp dirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from references import require  # tests/references.py: skip here, fail under `make test`

transformers = require("transformers", module_level=True)
from safetensors.torch import load_file, save_file  # noqa: E402

import mm1.models  # noqa: E402,F401
from mm1.config import VisionConfig  # noqa: E402
from mm1.models.hf_vision import load_hf_vision, load_hf_vision_into, vision_config_from_hf  # noqa: E402
from mm1.models.vision import ViT  # noqa: E402

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)
ATOL = 1e-4


def _save(model, path: Path) -> Path:
    model.eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY))
    with torch.no_grad():  # random (not zero) biases and norms so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return _save(model, tmp_path_factory.mktemp("clip")), model


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    torch.manual_seed(1)
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return _save(model, tmp_path_factory.mktemp("siglip")), model


def _hf(model, pixels, **kw):
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True, **kw)


def _ours(vit, pixels):
    with torch.no_grad():
        return vit.eval()(pixels)


def test_clip_features_match_transformers_last_hidden_state_and_penultimate(clip_dir):
    path, ref = clip_dir
    x = torch.randn(2, 3, 32, 32)
    out = _hf(ref, x)
    torch.testing.assert_close(_ours(load_hf_vision(path), x), out.last_hidden_state[:, 1:], rtol=0, atol=ATOL)
    torch.testing.assert_close(
        _ours(load_hf_vision(path, feature_layer=-2), x), out.hidden_states[-2][:, 1:], rtol=0, atol=ATOL
    )


def test_siglip_features_match_transformers_including_its_post_layernorm(siglip_dir):
    path, ref = siglip_dir
    x = torch.randn(2, 3, 32, 32)
    out = _hf(ref, x)
    torch.testing.assert_close(_ours(load_hf_vision(path), x), out.last_hidden_state, rtol=0, atol=ATOL)
    # hidden_states[-2] is the raw penultimate block output: no post-norm there.
    torch.testing.assert_close(
        _ours(load_hf_vision(path, feature_layer=-2), x), out.hidden_states[-2], rtol=0, atol=ATOL
    )


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_other_resolutions_match_transformers_interpolate_pos_encoding(family, clip_dir, siglip_dir):
    # HF interpolates bicubically with align_corners=False to the target grid, as we do.
    path, ref = clip_dir if family == "clip" else siglip_dir
    x = torch.randn(2, 3, 48, 48)
    want = _hf(ref, x, interpolate_pos_encoding=True).last_hidden_state[:, (1 if family == "clip" else 0) :]
    torch.testing.assert_close(_ours(load_hf_vision(path), x), want, rtol=0, atol=ATOL)  # at run time
    resized = load_hf_vision(path, image_size=48)  # at load time (SFT)
    assert resized.cfg.image_size == 48 and resized.pos_embed.shape[1] == 36 + (family == "clip")
    torch.testing.assert_close(_ours(resized, x), want, rtol=0, atol=ATOL)


def test_full_clip_and_siglip_models_load_their_vision_tower_and_skip_the_rest(tmp_path):
    torch.manual_seed(2)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
    for name, cls, cfg_cls in [
        ("clip", transformers.CLIPModel, transformers.CLIPConfig),
        ("siglip", transformers.SiglipModel, transformers.SiglipConfig),
    ]:
        model = cls(cfg_cls(text_config=text, vision_config=TINY)).eval()
        path = _save(model, tmp_path / name)
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            want = model.vision_model(pixel_values=x).last_hidden_state[:, (1 if name == "clip" else 0) :]
        torch.testing.assert_close(_ours(load_hf_vision(path), x), want, rtol=0, atol=ATOL)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(edit(dict(load_file(src / "model.safetensors"))), dst / "model.safetensors")
    return dst


def test_a_missing_weight_is_named_in_the_error(clip_dir, tmp_path):
    key = "encoder.layers.1.mlp.fc1.weight"
    path = _rewrite(clip_dir[0], tmp_path / "m", lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match=r"missing keys.*blocks\.1\.fc1\.weight \(HF: encoder\.layers\.1\.mlp\.fc1"):
        load_hf_vision(path)


def test_an_unknown_weight_is_named_in_the_error(siglip_dir, tmp_path):
    path = _rewrite(siglip_dir[0], tmp_path / "u", lambda sd: {**sd, "encoder.layers.0.adapter.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unknown keys.*encoder\.layers\.0\.adapter\.weight"):
        load_hf_vision(path)


def test_configs_follow_each_family_and_the_preprocessor_mean_std(clip_dir, siglip_dir, tmp_path):
    clip = vision_config_from_hf(json.loads((clip_dir[0] / "config.json").read_text()))
    assert (clip.use_cls, clip.pre_norm, clip.post_norm, clip.act) == (True, True, False, "quick_gelu")
    sig = vision_config_from_hf(
        json.loads((siglip_dir[0] / "config.json").read_text()),
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 0.5]},
    )
    assert (sig.use_cls, sig.pre_norm, sig.post_norm, sig.act, sig.norm_eps) == (False, False, True, "gelu_tanh", 1e-6)
    assert sig.std == [0.25, 0.5, 0.5]
    path = _rewrite(siglip_dir[0], tmp_path / "p", lambda sd: sd)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]}))
    vit = load_hf_vision(path)
    assert vit.cfg.mean == [0.1, 0.2, 0.3] and vit.cfg.std == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="model_type='vit'"):
        vision_config_from_hf({"model_type": "vit"})


def test_loading_into_a_run_config_checks_the_architecture_and_resizes_positions(clip_dir):
    path, ref = clip_dir
    wrong = ViT(VisionConfig(image_size=32, patch_size=8, width=32, depth=3, heads=4, mlp_dim=64))
    with pytest.raises(ValueError, match="model.vision.use_cls=True"):
        load_hf_vision_into(wrong, path)
    cfg = vision_config_from_hf(json.loads((path / "config.json").read_text()))
    cfg.image_size = 48
    with torch.device("meta"):
        vit = ViT(cfg)  # as build_model(device="meta") would make it
    load_hf_vision_into(vit, path)
    assert not any(p.is_meta for p in vit.parameters())
    x = torch.randn(1, 3, 48, 48)
    want = _hf(ref, x, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
    torch.testing.assert_close(_ours(vit, x), want, rtol=0, atol=ATOL)
