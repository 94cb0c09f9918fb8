"""HF Llama / Qwen2 checkpoints load into mm1's LanguageModel and give the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from references import require  # tests/references.py: skip here, fail under `make test`

transformers = require("transformers", module_level=True)

from mm1.config import LMConfig  # noqa: E402
from mm1.models.hf_lm import (  # noqa: E402
    convert_hf_lm_state_dict,
    lm_config_from_hf,
    load_hf_lm,
    load_hf_lm_into,
    read_hf_state_dict,
)
from mm1.models.lm import LanguageModel  # noqa: E402

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=56,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)


def _save(tmp_path, arch: str, max_shard_size: str | None = None, **kw):
    torch.manual_seed(0)
    if arch == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **kw}))
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**TINY, **kw}))
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: randomise so they are tested
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(tmp_path, **kwargs)
    return hf


def _assert_same_logits(hf, ours: LanguageModel) -> None:
    ids = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours.forward_ids(ids).logits
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),  # GQA, untied
        ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=5000.0)),  # tied
        ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),  # qkv bias
        ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
        (
            "llama",
            dict(
                num_key_value_heads=2,
                tie_word_embeddings=False,
                max_position_embeddings=512,  # Llama-3.1
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            ),
        ),
    ],
)
def test_hf_causal_lm_logits_match_within_1e4(tmp_path, arch, kw):
    hf = _save(tmp_path, arch, **kw)
    ours = load_hf_lm(tmp_path).eval()
    assert ours.cfg.qkv_bias == (arch == "qwen2")
    assert ours.cfg.tie_embeddings == kw["tie_word_embeddings"]
    assert ours.cfg.kv_heads == kw["num_key_value_heads"]
    _assert_same_logits(hf, ours)


def test_sharded_checkpoint_loads_every_shard(tmp_path):
    hf = _save(tmp_path, "llama", max_shard_size="20KB", num_key_value_heads=2)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _assert_same_logits(hf, load_hf_lm(tmp_path).eval())


def test_load_into_existing_model_and_config_roundtrip(tmp_path):
    hf = _save(tmp_path, "qwen2", num_key_value_heads=2)
    cfg = lm_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    ours = LanguageModel(cfg).eval()
    load_hf_lm_into(ours, tmp_path)
    _assert_same_logits(hf, ours)


def test_loading_dense_weights_into_moe_model_upcycles_experts(tmp_path):
    hf = _save(tmp_path, "llama", num_key_value_heads=2)
    cfg = lm_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    cfg.n_experts, cfg.moe_every, cfg.moe_top_k = 4, 1, 2
    moe = LanguageModel(cfg).eval()
    load_hf_lm_into(moe, tmp_path)
    assert moe.layers[0].is_moe and moe.layers[1].is_moe
    _assert_same_logits(hf, moe)  # every expert is the dense FFN, so routing cannot change the output


def test_unexpected_key_error_names_the_key(tmp_path):
    _save(tmp_path, "llama", num_key_value_heads=2)
    sd = read_hf_state_dict(tmp_path)
    sd["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2)
    cfg = lm_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.extra_proj\.weight"):
        convert_hf_lm_state_dict(sd, cfg)


def test_missing_key_error_names_the_key(tmp_path):
    from safetensors.torch import save_file

    _save(tmp_path, "llama", num_key_value_heads=2)
    sd = read_hf_state_dict(tmp_path)
    del sd["model.layers.1.post_attention_layernorm.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing: layers\.1\.ffn_norm\.weight"):
        load_hf_lm(tmp_path)


def test_untied_checkpoint_without_lm_head_is_refused(tmp_path):
    from safetensors.torch import save_file

    _save(tmp_path, "llama", num_key_value_heads=2, tie_word_embeddings=False)
    sd = read_hf_state_dict(tmp_path)
    del sd["lm_head.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"output\.weight"):
        load_hf_lm(tmp_path)


def test_config_mismatch_names_the_fields_to_set(tmp_path):
    _save(tmp_path, "llama", num_key_value_heads=2)
    wrong = LanguageModel(LMConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=56))
    with pytest.raises(ValueError, match=r"model\.lm\.n_kv_heads=2"):
        load_hf_lm_into(wrong, tmp_path)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}}, "yarn"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 16}, "head_dim"),
    ],
)
def test_unsupported_hf_features_are_refused_not_ignored(change, match):
    base = {
        "model_type": "llama",
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 56,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    with pytest.raises(ValueError, match=match):
        lm_config_from_hf({**base, **change})


def test_missing_weights_file_explains_what_is_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_lm(tmp_path)


@pytest.mark.parametrize("tied", [False, True])
def test_added_tokens_grow_the_vocab_with_mean_rows_and_keep_the_original_logits(tmp_path, tied):
    hf = _save(tmp_path, "llama", num_key_value_heads=2, tie_word_embeddings=tied)
    cfg = lm_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    cfg.vocab_size = TINY["vocab_size"] + 5  # <image>, chat markers ... added by the tokenizer
    ours = LanguageModel(cfg).eval()
    load_hf_lm_into(ours, tmp_path)
    emb = ours.tok_embeddings.weight
    old = hf.model.embed_tokens.weight
    assert emb.shape[0] == cfg.vocab_size
    torch.testing.assert_close(emb[TINY["vocab_size"] :], old.mean(0, keepdim=True).expand(5, -1))
    if tied:
        assert ours.output is None  # the head is the embedding matrix: still one tensor
    else:
        torch.testing.assert_close(ours.output.weight[-1], hf.lm_head.weight.mean(0))
    ids = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(input_ids=ids).logits, ours.forward_ids(ids).logits
    assert got.shape[-1] == cfg.vocab_size
    assert (got[..., : TINY["vocab_size"]] - ref).abs().max() < 1e-5
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)  # and it trains, new tokens included
    batch = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    batch[:, 3] = cfg.vocab_size - 1
    losses = []
    for _ in range(2):
        logits = ours.train().forward_ids(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]
