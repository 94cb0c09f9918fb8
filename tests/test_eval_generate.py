"""Generation: left-padded batches decode exactly like single prompts, the KV cache changes nothing,
stop strings cut the text, and log-likelihood scoring ranks options consistently."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from mm1.config import Config
from mm1.data.tokenizer import Tokenizer
from mm1.eval.generate import GenerationConfig, cut_at_stops, generate, generate_ids
from mm1.eval.scoring import choose_options, continuation_logprobs, perplexity
from mm1.models.build import build_model

TEXTS = [
    "a red circle and a blue square",
    "Question: what colour is the star? Short answer: yellow",
    "three small green triangles on a grey background",
    "the quick brown fox jumps over the lazy dog",
] * 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = Tokenizer.train(TEXTS, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")
    cfg = Config()
    v, c, lm = cfg.model.vision, cfg.model.connector, cfg.model.lm
    v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_dim = 16, 8, 32, 1, 2, 64
    c.kind, c.num_tokens = "avgpool", 4
    lm.vocab_size, lm.dim, lm.n_layers, lm.n_heads, lm.ffn_dim, lm.max_seq_len = tok.vocab_size, 64, 2, 4, 128, 512
    cfg.model.image_token_id = tok.image_id
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # larger logits: fewer near-ties, so argmax is a sharp test
        model.lm.tok_embeddings.weight.mul_(4.0)
    images = [Image.new("RGB", (20, 20), col) for col in ("red", "blue", "green")]
    return model, tok, images


PROMPTS = [
    "<image>A short description:",
    "Question: what colour",
    "<image>Question: x <image> Short answer:",
    "the quick brown fox jumps over the lazy dog and then some more words to make it long",
]


def _imgs(images):
    return [[images[0]], [], [images[1], images[2]], []]


def test_batched_left_padded_generation_equals_one_by_one(setup):
    model, tok, images = setup
    gcfg = GenerationConfig(max_new_tokens=8, stop=[], batch_size=4)
    batch_logits: list[torch.Tensor] = []
    batched = generate_ids(model, tok, PROMPTS, _imgs(images), gcfg, scores=batch_logits)
    single = []
    for i, (p, im) in enumerate(zip(PROMPTS, _imgs(images))):
        own: list[torch.Tensor] = []
        single += generate_ids(model, tok, [p], [im], gcfg, scores=own)
        # not only the argmax: every step's logits match those of the padded batch row
        torch.testing.assert_close(
            torch.cat(own), torch.stack([s[i] for s in batch_logits[: len(own)]]), atol=1e-4, rtol=1e-4
        )
    assert batched == single
    assert all(len(r) > 0 for r in batched)
    assert generate(model, tok, PROMPTS, _imgs(images), max_new_tokens=8, stop=[], batch_size=3) == [
        tok.decode(r) for r in single
    ]


def test_kv_cache_greedy_equals_recomputing_the_full_sequence(setup):
    model, tok, images = setup
    cached_logits, full_logits = [], []
    cached = generate_ids(
        model, tok, PROMPTS, _imgs(images), GenerationConfig(max_new_tokens=10, stop=[]), scores=cached_logits
    )
    full = generate_ids(
        model,
        tok,
        PROMPTS,
        _imgs(images),
        GenerationConfig(max_new_tokens=10, stop=[], use_cache=False),
        scores=full_logits,
    )
    assert cached == full
    torch.testing.assert_close(torch.stack(cached_logits), torch.stack(full_logits), atol=1e-4, rtol=1e-4)


def test_sampling_is_seeded_and_never_emits_image_or_pad_tokens(setup):
    model, tok, images = setup
    g = GenerationConfig(max_new_tokens=12, stop=[], do_sample=True, temperature=2.0, top_k=50, top_p=0.95, seed=3)
    a = generate_ids(model, tok, PROMPTS, _imgs(images), g)
    b = generate_ids(model, tok, PROMPTS, _imgs(images), g)
    assert a == b
    assert not {tok.image_id, tok.pad_id, tok.bos_id} & {t for row in a for t in row}


def test_stop_strings_cut_the_text():
    assert cut_at_stops("a dog\nQuestion: more", ["\n"]) == "a dog"
    assert cut_at_stops("blue Question: x", ["\n", "Question:"]) == "blue "
    assert cut_at_stops("no stop here", ["\n"]) == "no stop here"


def test_marker_count_must_match_images(setup):
    model, tok, images = setup
    with pytest.raises(ValueError, match="1 <image> markers but 2 images"):
        generate(model, tok, ["<image>hi"], [[images[0], images[1]]])


def test_option_scores_do_not_depend_on_batching_and_pick_the_best(setup):
    model, tok, images = setup
    opts = ["red", "blue", "green square", "yellow"]
    best, scores = choose_options(model, tok, "<image>Question: what colour? Answer:", opts, [images[0]])
    alone = [
        continuation_logprobs(model, tok, ["<image>Question: what colour? Answer:"], [" " + o], [[images[0]]])[0][0]
        for o in opts
    ]
    assert scores == pytest.approx(alone, abs=1e-4)
    assert best == max(range(4), key=lambda i: alone[i])
    ppl, nll = perplexity(model, tok, TEXTS[:3])
    assert ppl > 1 and len(nll) == 3 and math.isfinite(ppl)


def test_mm1_generate_answers_one_prompt_from_a_checkpoint(setup, tmp_path, capsys):
    import json

    from mm1.cli import main
    from mm1.config import to_yaml
    from mm1.train.checkpoint import CHECKSUMS, sha256, write_weights

    model, tok, images = setup
    ckpt = tmp_path / "step-1"
    ckpt.mkdir()
    cfg = Config()
    cfg.model = model.cfg
    cfg.data.seq_len = 64
    write_weights(model.state_dict(), ckpt / "model.safetensors")
    (ckpt / "config.yaml").write_text(to_yaml(cfg))
    tok.save(ckpt / "tokenizer.json")
    (ckpt / CHECKSUMS).write_text(json.dumps({f.name: sha256(f) for f in ckpt.iterdir()}))
    images[0].save(tmp_path / "a.png")
    expected = generate(
        model, tok, ["<image>A short description:"], [[str(tmp_path / "a.png")]], max_new_tokens=6, stop=[]
    )[0]
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(ckpt),
                "--image",
                str(tmp_path / "a.png"),
                "--prompt",
                "A short description:",
                "--max-new-tokens",
                "6",
                "--stop",
                "",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "<image>x"]) == 2


def test_a_conversation_prompt_uses_the_chat_template_and_stops_at_im_end(setup):
    from mm1.eval.generate import encode_prompt

    model, tok, images = setup
    conv = [{"role": "user", "content": "<image>\nWhat colour?"}]
    assert encode_prompt(tok, conv, 4) == tok.chat_prompt("<image>\nWhat colour?", 4)
    free = generate_ids(model, tok, [conv], [[images[0]]], GenerationConfig(max_new_tokens=6, stop=[]))[0]
    cut = generate_ids(
        model, tok, [conv], [[images[0]]], GenerationConfig(max_new_tokens=6, stop=[], stop_ids=[free[0]])
    )
    assert cut == [[]] and len(free) == 6
