"""The MLLM: image features land in the slot positions in order, loss only on targets, sizing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm1.config import load_config
from mm1.models import build_model
from mm1.models.mllm import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.lm.n_layers=2", "model.vision.depth=2"])
    return cfg, build_model(cfg.model).eval()


def _sequence(cfg, n_images: int, length: int = 60) -> torch.Tensor:
    k = cfg.model.tokens_per_image
    ids = torch.randint(10, cfg.model.lm.vocab_size, (length,))
    for i in range(n_images):
        start = 2 + i * (k + 3)
        ids[start : start + k] = cfg.model.image_token_id
    return ids


def test_images_fill_slot_positions_in_order_of_appearance(tiny):
    cfg, model = tiny
    images = torch.randn(3, 3, 64, 64)
    ids = torch.stack([_sequence(cfg, 2), _sequence(cfg, 1)])  # row 0 holds images 0,1; row 1 image 2
    embeds = model.embed(ids, images)
    feats = model.encode_images(images)  # [3, k, D]
    slots = ids == cfg.model.image_token_id
    torch.testing.assert_close(embeds[0][slots[0]], feats[:2].reshape(-1, feats.shape[-1]))
    torch.testing.assert_close(embeds[1][slots[1]], feats[2])
    text = model.lm.tok_embeddings(ids)
    torch.testing.assert_close(embeds[~slots], text[~slots])


def test_slot_count_mismatch_is_a_clear_error(tiny):
    cfg, model = tiny
    ids = _sequence(cfg, 2).unsqueeze(0)
    with pytest.raises(ValueError, match="slot tokens"):
        model.embed(ids, torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="no images"):
        model.embed(ids, None)


def test_loss_counts_only_positions_with_targets(tiny):
    cfg, model = tiny
    ids = _sequence(cfg, 1).unsqueeze(0)
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[0, 40:50] = ids[0, 41:51]
    out = model(ids, torch.randn(1, 3, 64, 64), targets=targets)
    assert out.token_loss[targets == IGNORE_INDEX].abs().sum() == 0
    manual = torch.nn.functional.cross_entropy(out.logits[0, 40:50], targets[0, 40:50])
    torch.testing.assert_close(out.lm_loss, manual)
    out.loss.backward()
    assert model.connector.parameters().__next__().grad is not None  # image path is trained


def test_image_changes_only_tokens_after_it(tiny):
    cfg, model = tiny
    ids = _sequence(cfg, 1, length=50).unsqueeze(0)
    a = model(ids, torch.zeros(1, 3, 64, 64)).logits
    b = model(ids, torch.ones(1, 3, 64, 64)).logits
    assert torch.equal(a[:, :2], b[:, :2])  # causal: tokens before the image do not see it
    assert not torch.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize(
    "preset, target, tolerance",
    [("mm1-3b", 3e9, 0.05), ("mm1-7b", 7e9, 0.05), ("mm1-30b", 30e9, 0.05)],
)
def test_presets_size_matches_their_name(preset, target, tolerance):
    out = subprocess.run(
        [sys.executable, "-m", "mm1", "info", str(ROOT / "configs" / f"{preset}.yaml"), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    info = json.loads(out.stdout)
    assert abs(info["params"]["total"] - target) / target < tolerance, info["params"]
    assert info["image_tokens_per_image"] == 144


@pytest.mark.parametrize("preset, total, tolerance", [("mm1-3b-moe", 64e9, 0.10), ("mm1-7b-moe", 47e9, 0.10)])
def test_moe_presets_report_total_and_active(preset, total, tolerance):
    from mm1.models.info import describe

    info = describe(load_config(ROOT / "configs" / f"{preset}.yaml"))
    params = info["params"]
    assert abs(params["total"] - total) / total < tolerance, params
    dense = describe(load_config(ROOT / "configs" / f"{preset.removesuffix('-moe')}.yaml"))["params"]["total"]
    assert dense < params["active"] < params["total"] / 5  # top-2 of many experts is a small share
