"""CPU decoding layout: weights re-stored [in, out] keep their values and give bit-identical decoding
steps, training mode and checkpoints see the standard layout, and generation never changes a token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm1.config import Config, LMConfig
from mm1.data.tokenizer import Tokenizer
from mm1.eval.generate import GenerationConfig, generate, generate_ids
from mm1.models.build import build_model
from mm1.models.decode_layout import prepare_decode_layout, restore_standard_layout
from mm1.models.lm import LanguageModel
from mm1.train.checkpoint import read_weights, write_weights

ROWS = 4


def _lm() -> LanguageModel:
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=128)
    return LanguageModel(cfg).eval()


def _decode_logits(lm: LanguageModel, ids: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """Logits of a prompt pass and `steps` cached decoding steps of `ids` [ROWS, T]."""
    with torch.inference_mode():
        cache = lm.new_cache(ids.shape[0], ids.shape[1] + steps)
        out = [lm.forward_ids(ids, cache=cache).logits[:, -1]]
        for _ in range(steps):
            out.append(lm.forward_ids(out[-1].argmax(-1)[:, None], cache=cache).logits[:, -1])
    return torch.stack(out)


def test_relaid_weights_keep_values_and_give_bit_identical_decoding_steps():
    lm = _lm()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    ids = torch.randint(6, 300, (ROWS, 12))
    reference = _decode_logits(lm, ids)

    layout = prepare_decode_layout(lm, ROWS)
    linears = {n: m for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(layout.transposed) | {n for n, m in linears.items() if tuple(m.weight.shape) in layout.excluded} == set(
        linears
    )
    for name in layout.transposed:
        w = linears[name].weight
        assert w.stride() == (1, w.shape[0]), name  # a transposed view of [in, out] storage
    for k, v in lm.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(_decode_logits(lm, ids), reference)
    assert prepare_decode_layout(lm, ROWS) is layout  # once per model


def test_a_later_batch_size_keeps_only_shapes_with_identical_products_at_that_size():
    lm = _lm()
    prepare_decode_layout(lm, ROWS)
    ids = torch.randint(6, 300, (1, 12))
    layout = prepare_decode_layout(lm, 1)
    assert layout.checked_rows == [ROWS, 1]
    linears = {n: m for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, module in linears.items():
        w = module.weight
        x = torch.randn(1, w.shape[1])
        if name in layout.transposed:  # still transposed only where one row gives the same products
            assert torch.equal(F.linear(x, w), F.linear(x, w.contiguous())), name
        else:
            assert w.is_contiguous(), name
    decoded = _decode_logits(lm, ids)
    restore_standard_layout(lm)
    assert torch.equal(decoded, _decode_logits(lm, ids))


def test_training_mode_restores_the_standard_layout():
    lm = _lm()
    prepare_decode_layout(lm, ROWS)
    assert any(not m.weight.is_contiguous() for m in lm.modules() if isinstance(m, torch.nn.Linear))
    weights = {k: v.clone() for k, v in lm.state_dict().items()}
    lm.train()
    assert lm.decode_layout is None
    assert all(p.is_contiguous() for p in lm.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in lm.state_dict().items())
    # ...and training still works on the restored weights
    loss = lm.forward_ids(torch.randint(6, 300, (2, 8))).logits.float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in lm.parameters() if p.requires_grad)


def test_a_checkpoint_written_from_the_decode_layout_reads_back_identical(tmp_path):
    lm = _lm()
    prepare_decode_layout(lm, ROWS)
    write_weights(lm.state_dict(), tmp_path / "model.safetensors")
    back = read_weights(tmp_path / "model.safetensors")
    restore_standard_layout(lm)
    assert back.keys() == lm.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in lm.state_dict().items())


def test_generation_gives_the_same_tokens_with_and_without_the_layout(tmp_path):
    texts = ["a red circle and a blue square", "three small green triangles", "the quick brown fox"] * 20
    tok = Tokenizer.train(texts, 300, tmp_path / "tokenizer.json")
    cfg = Config().model
    cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width, cfg.vision.depth = 16, 8, 32, 1
    cfg.vision.heads, cfg.vision.mlp_dim = 2, 64
    cfg.connector.kind, cfg.connector.num_tokens = "avgpool", 4
    cfg.lm.vocab_size, cfg.lm.dim, cfg.lm.n_layers, cfg.lm.n_heads, cfg.lm.ffn_dim = tok.vocab_size, 64, 2, 4, 160
    cfg.image_token_id = tok.image_id
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    prompts = ["a red", "three small green", "the quick brown fox", "a blue"]
    images = [[] for _ in prompts]

    plain = generate_ids(
        model, tok, prompts, images, GenerationConfig(max_new_tokens=10, stop=[], cpu_decode_layout=False)
    )
    assert getattr(model.lm, "decode_layout", None) is None
    relaid = generate_ids(model, tok, prompts, images, GenerationConfig(max_new_tokens=10, stop=[]))
    assert model.lm.decode_layout is not None and model.lm.decode_layout.checked_rows == [len(prompts)]
    assert relaid == plain and any(plain)

    # a later batch of another size (here 1 row: a gemv path) decodes as the standard order does
    one = GenerationConfig(max_new_tokens=10, stop=[])
    alone = [
        generate_ids(model, tok, [p], [[]], GenerationConfig(max_new_tokens=10, stop=[], cpu_decode_layout=False))[0]
        for p in prompts
    ]
    assert [generate_ids(model, tok, [p], [[]], one)[0] for p in prompts] == alone
    assert model.lm.decode_layout.checked_rows == [len(prompts), 1]

    # generate() returns a training model to training mode, and with it the standard layout
    model.train()
    generate(model, tok, prompts, images, max_new_tokens=3)
    assert model.training and model.lm.decode_layout is None
    assert all(p.is_contiguous() for p in model.parameters())
