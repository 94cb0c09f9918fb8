"""The encoder stage's objectives against hand-computed values, and an encoder run that learns:
CLIP (softmax over the batch, both directions), SigLIP (pairwise sigmoid), AIM (next-patch
regression of per-patch-normalised pixels behind a prefix-causal mask) and SuperClass (caption
words as IDF-weighted classification targets, the IDF counted online). A finite loss proves
nothing (labels shifted by one still train to a finite loss), so the values are recomputed here
with plain Python loops, and a short CLIP run must retrieve held-out captions above chance."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mm1.config import load_config
from mm1.data.images import load_image, preprocess
from mm1.data.tokenizer import Tokenizer
from mm1.data.world.items import caption_item
from mm1.train.distributed import DistEnv
from mm1.train.encoder import (
    EncoderPretrainer,
    clip_loss,
    pooled_logits,
    siglip_loss,
    superclass_loss,
    word_recall,
)
from mm1.train.stages import build_stage_module
from mm1.train.trainer import train

N, E = 4, 5  # pairs in the batch, embedding width


def _pairs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(N, E, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(N, E, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def test_clip_loss_is_the_symmetric_cross_entropy_with_pair_i_as_the_answer_for_row_i():
    img, txt = _pairs()
    s = 3.0
    I, T = img.tolist(), txt.tolist()
    sim = [[s * _dot(I[i], T[j]) for j in range(N)] for i in range(N)]
    image_to_text = sum(math.log(sum(math.exp(v) for v in sim[i])) - sim[i][i] for i in range(N)) / N
    text_to_image = sum(math.log(sum(math.exp(sim[i][j]) for i in range(N))) - sim[j][j] for j in range(N)) / N
    expected = 0.5 * (image_to_text + text_to_image)
    assert clip_loss(img, txt, torch.tensor(s, dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-12)
    # matching pairs give a lower loss than the same embeddings paired wrongly
    assert clip_loss(img, img, torch.tensor(10.0)).item() < clip_loss(img, img.roll(1, 0), torch.tensor(10.0)).item()


def test_siglip_loss_sums_every_pairs_log_sigmoid_with_plus_one_only_on_the_diagonal():
    img, txt = _pairs(1)
    s, b = 10.0, -4.0
    I, T = img.tolist(), txt.tolist()
    total = 0.0
    for i in range(N):
        for j in range(N):
            z = 1.0 if i == j else -1.0
            total += math.log(1.0 / (1.0 + math.exp(-z * (s * _dot(I[i], T[j]) + b))))
    got = siglip_loss(img, txt, torch.tensor(s, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert got.item() == pytest.approx(-total / N, rel=1e-12)


# ----------------------------------------------------------------------------- AIM

P_SIZE, IMG = 4, 16  # 4x4 patches of 4 px: 16 patches


def _small_encoder_config(objective: str):
    """The encoder stage with a 16 px, 4 px-patch ViT of width 32: small enough to check by hand."""
    return load_config(
        "configs/tiny.yaml",
        [
            "train.stage=encoder",
            f"train.encoder_objective={objective}",
            f"model.vision.image_size={IMG}",
            f"model.vision.patch_size={P_SIZE}",
            "model.vision.width=32",
            "model.vision.depth=2",
            "model.vision.heads=2",
            "model.vision.mlp_dim=64",
        ],
    )


def _aim_model() -> EncoderPretrainer:
    torch.manual_seed(0)
    return EncoderPretrainer(_small_encoder_config("aim"), 64, set(), DistEnv()).eval()


def _aim_forward(model: EncoderPretrainer, pixels: torch.Tensor) -> tuple[float, torch.Tensor, int]:
    """(loss, the head's predictions [N, P-prefix, 3p²], prefix); the prefix is drawn from the
    global RNG, so it is re-seeded for every call."""
    seen: dict[str, torch.Tensor] = {}
    hook = model.head.register_forward_hook(lambda m, i, o: seen.update(pred=o.detach().clone()))
    try:
        torch.manual_seed(5)
        with torch.no_grad():
            loss = model.aim_loss(pixels).item()
    finally:
        hook.remove()
    pred = seen["pred"].double()
    return loss, pred, (IMG // P_SIZE) ** 2 - pred.shape[1]


def _patch_targets(pixels: torch.Tensor) -> list[list[list[float]]]:
    """Per image, per patch (row-major), the patch's pixels in (channel, y, x) order, normalised to
    zero mean and unit (sample) variance: written out with loops, not unfold."""
    out = []
    g = IMG // P_SIZE
    for img in pixels.double().tolist():
        patches = []
        for k in range(g * g):
            r, c = divmod(k, g)
            vals = [
                img[ch][r * P_SIZE + y][c * P_SIZE + x] for ch in range(3) for y in range(P_SIZE) for x in range(P_SIZE)
            ]
            mean = sum(vals) / len(vals)
            var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
            patches.append([(v - mean) / math.sqrt(var + 1e-6) for v in vals])
        out.append(patches)
    return out


def test_aim_loss_is_the_mse_to_the_next_normalised_patch_after_the_prefix():
    model = _aim_model()
    pixels = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    loss, pred, prefix = _aim_forward(model, pixels)
    targets = _patch_targets(pixels)
    n_patches = (IMG // P_SIZE) ** 2
    assert 1 <= prefix < n_patches - 2  # the seed draws a prefix that leaves several predicted patches
    err, count = 0.0, 0
    for b in range(2):
        for row, patch in enumerate(range(prefix, n_patches)):  # row r of the head predicts patch prefix + r
            for p_val, t_val in zip(pred[b, row].tolist(), targets[b][patch]):
                err += (p_val - t_val) ** 2
                count += 1
    assert loss == pytest.approx(err / count, rel=1e-5)


def test_aim_predicts_each_patch_without_seeing_it_or_any_later_patch():
    model = _aim_model()
    pixels = torch.randn(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    _, base, prefix = _aim_forward(model, pixels)
    g = IMG // P_SIZE
    q = (IMG // P_SIZE) ** 2 - 2  # a patch after the prefix with one patch after it
    assert q > prefix
    changed = pixels.clone()
    r, c = divmod(q, g)
    changed[:, :, r * P_SIZE : (r + 1) * P_SIZE, c * P_SIZE : (c + 1) * P_SIZE] += 3.0
    _, after, prefix_again = _aim_forward(model, changed)
    assert prefix_again == prefix
    upto_q = q - prefix + 1  # the rows predicting patches prefix..q see only patches before q
    torch.testing.assert_close(after[:, :upto_q], base[:, :upto_q], rtol=0, atol=1e-6)
    assert (after[:, upto_q:] - base[:, upto_q:]).abs().max() > 1e-4  # the row predicting q+1 sees q


# ----------------------------------------------------------------------------- SuperClass


def test_superclass_loss_is_the_cross_entropy_to_each_captions_idf_weighted_words():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, generator=g, dtype=torch.float64)
    hot = torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    idf = torch.tensor([0.5, 0.7, 2.0, 1.0, 0.0], dtype=torch.float64)
    rows = logits.tolist()
    log_p = [[v - math.log(sum(math.exp(u) for u in r)) for v in r] for r in rows]
    row0 = -(0.7 * log_p[0][1] + 1.0 * log_p[0][3]) / 1.7  # weights 0.7 and 1.0, normalised
    row1 = -log_p[1][0]
    row2 = 0.0  # its only word has zero weight (it is in every caption): no target
    assert superclass_loss(logits, hot, idf).item() == pytest.approx(row0 + row1 + row2, rel=1e-12)


def test_superclass_pooling_is_the_mean_token_or_the_log_sum_exp_of_per_token_logits():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(3, 4).double()
    tokens = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    head.requires_grad_(False)
    mean = pooled_logits(head, tokens, "mean")
    assert torch.allclose(mean, head(tokens).mean(1).float())  # a linear head: the mean of the token logits
    lse = pooled_logits(head, tokens, "lse")
    z = head(tokens).float()
    for n in range(2):
        for v in range(4):
            want = math.log(sum(math.exp(5.0 * float(z[n, t, v])) for t in range(5)) / 5) / 5.0
            assert float(lse[n, v]) == pytest.approx(want, rel=1e-5)
    assert (lse >= mean - 1e-6).all() and (lse <= z.amax(1) + 1e-6).all()  # between the mean and the max
    spike = tokens.clone()
    spike[0, 2] += 10 * head.weight[1]  # one token shows class 1 strongly: lse follows it more than mean
    assert pooled_logits(head, spike, "lse")[0, 1] - lse[0, 1] > pooled_logits(head, spike, "mean")[0, 1] - mean[0, 1]


def test_token_log_sum_exp_has_autograds_value_and_gradient_and_leaves_its_input_alone():
    from mm1.train.encoder import TokenLogSumExp

    g = torch.Generator().manual_seed(0)
    z64 = torch.randn(2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: TokenLogSumExp.apply(z, 3.0), (z64,))
    for dtype in (torch.float32, torch.bfloat16):  # the stage's logits: bf16 under autocast
        z = torch.randn(3, 8, 7, generator=g).to(dtype).requires_grad_()
        before = z.detach().clone()
        weights = torch.randn(3, 7, generator=g)
        ours = TokenLogSumExp.apply(z, 5.0)
        assert ours.dtype == torch.float32 and torch.equal(z.detach(), before)
        (grad,) = torch.autograd.grad((ours * weights).sum(), z)
        want = torch.logsumexp(z.float() * 5.0, 1)
        (want_grad,) = torch.autograd.grad((want * weights).sum(), z)
        torch.testing.assert_close(ours, want)
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), want_grad.float())


def test_word_recall_counts_caption_words_among_the_top_k_of_each_row():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    hot = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    # row 0: top 2 = {0, 1}, one of its 2 words; row 1: top 1 = {3}, its 1 word
    assert word_recall(logits, hot).item() == pytest.approx(2 / 3)


def test_superclass_counts_the_idf_over_training_captions_only_and_checkpoints_it():
    cfg = _small_encoder_config("superclass")
    image_id, k, pad = 60, cfg.model.tokens_per_image, 0
    cfg.model.image_token_id = image_id
    torch.manual_seed(0)
    model = EncoderPretrainer(cfg, 64, {image_id, pad}, DistEnv())
    captions = [[7, 9, 7], [9, 11], []]  # the third caption is empty: only its pad is pooled
    width = k + 3
    ids = torch.full((3, width), pad)
    for i, c in enumerate(captions):
        ids[i, : k + len(c)] = torch.tensor([image_id] * k + c)
    batch = {"input_ids": ids, "doc_ids": torch.zeros_like(ids), "images": torch.randn(3, 3, IMG, IMG)}
    out = model.train()(batch)
    assert torch.isfinite(out["loss_sum"]) and out["loss_sum"].requires_grad
    assert float(model.captions_seen) == 3
    want = torch.zeros(64, dtype=torch.float64)
    want[7], want[9], want[11] = 1, 2, 1  # captions containing each word; the pad is never a word
    assert torch.equal(model.token_captions, want)
    model.eval()(batch)  # scoring does not count
    assert float(model.captions_seen) == 3 and torch.equal(model.token_captions, want)
    state = model.state_dict()  # what a checkpoint (and so a resume) carries
    assert torch.equal(state["token_captions"], want) and float(state["captions_seen"]) == 3


def test_superclass_classifies_among_the_words_captions_have_contained_only():
    """The softmax runs over the words seen so far (here 7, 9, 11 of 64), not the whole vocabulary: the
    loss is the cross-entropy among those rows alone, and the other rows get no gradient."""
    cfg = _small_encoder_config("superclass")
    image_id, k, pad = 60, cfg.model.tokens_per_image, 0
    cfg.model.image_token_id = image_id
    torch.manual_seed(0)
    model = EncoderPretrainer(cfg, 64, {image_id, pad}, DistEnv()).train()
    model.token_captions[11] = 4  # seen in earlier captions, in none of this batch's
    model.captions_seen.fill_(10)
    ids = torch.tensor([[image_id] * k + [7, 9, 7], [image_id] * k + [9, pad, pad]])
    images = torch.randn(2, 3, IMG, IMG)
    out = model({"input_ids": ids, "doc_ids": torch.zeros_like(ids), "images": images})
    out["loss_sum"].backward()
    grad_rows = model.classifier.weight.grad.abs().sum(1).nonzero().flatten().tolist()
    assert grad_rows == [7, 9, 11]
    seen = torch.tensor([7, 9, 11])
    with torch.no_grad():
        logits = pooled_logits(model.classifier, model.vision(images), model.pool, seen)
        assert torch.allclose(logits, pooled_logits(model.classifier, model.vision(images), model.pool)[:, seen])
        idf = torch.log(12 / (1 + torch.tensor([1.0, 2.0, 4.0]))).clamp(min=0)  # 12 captions seen now
        hot = torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.bool)
        want = superclass_loss(logits, hot, idf)
    assert out["loss_sum"].item() == pytest.approx(want.item(), rel=1e-5)


def _group_model(weight: float) -> tuple[EncoderPretrainer, dict[str, torch.Tensor]]:
    """A SuperClass encoder whose words 20 and 21 form a group (word w is token w + 1), with a batch of
    two captions: [7, 9, 20] and [9, 21]."""
    cfg = _small_encoder_config("superclass")
    image_id, k, pad = 60, cfg.model.tokens_per_image, 0
    cfg.model.image_token_id = image_id
    cfg.train.superclass_groups, cfg.train.superclass_group_weight = [["w19", "w20"]], weight
    torch.manual_seed(0)
    model = EncoderPretrainer(cfg, 64, {image_id, pad}, DistEnv(), encode=lambda s: [int(s.strip()[1:]) + 1])
    model.captions_seen.fill_(10)  # ten earlier captions without these words: every word has a weight
    ids = torch.tensor([[image_id] * k + [7, 9, 20], [image_id] * k + [9, 21, pad]])
    return model.train(), {"input_ids": ids, "doc_ids": torch.zeros_like(ids), "images": torch.randn(2, 3, IMG, IMG)}


def test_a_superclass_word_group_is_classified_by_its_own_softmax_beside_the_others():
    """The group's words (e.g. the backgrounds) leave the main softmax: the loss is the main cross-entropy
    over the other seen words plus the weight times the group's own cross-entropy."""
    model, batch = _group_model(0.5)
    out = model(batch)
    with torch.no_grad():
        tokens = model.vision(batch["images"])
        main = pooled_logits(model.classifier, tokens, model.pool, torch.tensor([7, 9]))
        group = pooled_logits(model.classifier, tokens, model.pool, torch.tensor([20, 21]))
    idf = torch.log(torch.tensor([12 / 2, 12 / 3]))  # of 12 captions, 7 is in one, 9 in two
    want_main = superclass_loss(main, torch.tensor([[1, 1], [0, 1]], dtype=torch.bool), idf)
    want_group = -torch.log_softmax(group, -1)[[0, 1], [0, 1]].sum()  # caption 0 shows 20, caption 1 21
    assert out["loss_sum"].item() == pytest.approx((want_main + 0.5 * want_group).item(), rel=1e-5)
    right = (group.argmax(1) == torch.tensor([0, 1])).float().mean()
    assert out["metrics"]["group_accuracy"].item() == pytest.approx(right.item())
    unweighted = _group_model(0.0)[0]  # weight 0: the group's rows learn nothing
    unweighted(batch)["loss_sum"].backward()
    assert unweighted.classifier.weight.grad[[20, 21]].abs().sum() == 0
    assert unweighted.classifier.weight.grad[[7]].abs().sum() > 0


def test_a_superclass_word_group_must_be_single_tokens_and_the_weight_non_negative():
    from mm1.registry import ConfigError
    from mm1.train.encoder import word_group_ids

    assert word_group_ids([["plain", "striped"]], lambda s: {" plain": [4], " striped": [9]}[s], "k") == [[4, 9]]
    with pytest.raises(ConfigError, match=r"superclass_groups: \[.*\]: \['light grey'\] are not single"):
        word_group_ids([["plain", "light grey"]], lambda s: [1] if s == " plain" else [1, 2], "train.superclass_groups")
    with pytest.raises(ConfigError, match="two words or more"):
        word_group_ids([["plain"]], lambda s: [1], "k")
    with pytest.raises(ConfigError, match="train.superclass_group_weight"):
        load_config("configs/tiny.yaml", ["train.superclass_group_weight=-1"])


# ----------------------------------------------------------------------------- a CLIP run that learns

HELD_OUT = 64  # held-out pairs, scored in batches of 16 (chance: 1 in 16)
ENCODER = [
    "model.vision.image_size=32",
    "model.vision.width=64",
    "model.vision.depth=2",
    "model.vision.heads=2",
    "model.vision.mlp_dim=128",
    "data.seq_len=128",
    "data.batch_size=8",
    "data.synthetic_caption_ratio=1.0",
    "train.stage=encoder",
    "train.encoder_objective=clip",
    "train.lr=1e-3",
    "train.warmup_steps=5",
]


def _held_out_batches(world: Path, cfg, tok: Tokenizer) -> list[dict[str, torch.Tensor]]:
    """Caption samples drawn by the world's generator after the last one it wrote (indices 3000+),
    so no image or caption was trained on, in the encoder stage's batch layout: one pair per row."""
    v, k = cfg.model.vision, cfg.model.tokens_per_image
    items = [caption_item(0, 3000 + i, 128, frozenset()) for i in range(HELD_OUT)]
    batches = []
    for s in range(0, HELD_OUT, 16):
        chunk = items[s : s + 16]
        rows = [[tok.image_id] * k + tok.encode(it["dense"]) for it in chunk]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_id)
        docs = torch.full((len(rows), width), -1)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            docs[i, : len(r)] = 0
        pixels = torch.stack([preprocess(load_image(it["png"]), v.image_size, v.mean, v.std) for it in chunk])
        batches.append({"input_ids": ids, "doc_ids": docs, "images": pixels})
    return batches


def _held_out_accuracy(world: Path, run: Path | None) -> float:
    over = [f"data.world={world}", *ENCODER] + ([f"train.init_from={run}"] if run else [])
    cfg = load_config("configs/tiny.yaml", over)
    tok = Tokenizer.load(world / "tokenizer.json")
    cfg.model.image_token_id = tok.image_id
    torch.manual_seed(0)
    module = build_stage_module(cfg, tok.vocab_size, set(tok.special_ids), DistEnv(), "single").eval()
    with torch.no_grad():
        accs = [float(module(b)["metrics"]["retrieval_acc"]) for b in _held_out_batches(world, cfg, tok)]
    return sum(accs) / len(accs)


@pytest.mark.slow
def test_a_short_clip_run_retrieves_held_out_captions_above_chance(tiny_world, tmp_path):
    out = tmp_path / "clip"
    train(
        load_config(
            "configs/tiny.yaml", [f"data.world={tiny_world}", *ENCODER, "train.steps=60", "train.save_every=60"]
        ),
        out,
    )
    before, after = _held_out_accuracy(tiny_world, None), _held_out_accuracy(tiny_world, out)
    chance = 1 / 16
    assert before < 2 * chance, before  # the untrained towers are at chance
    assert after >= 3 * chance, (before, after)  # measured 0.30 (chance 0.0625)


def test_a_superclass_run_on_tags_learns_from_the_tag_words_alone(tiny_world, tmp_path):
    """`data.caption_text=tags`: the classes counted are the images' tags (shapes, colours, place words,
    the count, the background), never another caption word such as a size or "clipart"."""
    from mm1.data.world.language import BACKGROUND_WORDS, NUMBERS
    from mm1.data.world.scenes import COLOURS, POSITIONS, SHAPES
    from mm1.train.checkpoint import latest_checkpoint, read_checkpoint_weights

    over = ["train.encoder_objective=superclass", "data.caption_text=tags", "train.steps=3", "train.save_every=3"]
    train(load_config("configs/tiny.yaml", [f"data.world={tiny_world}", *ENCODER, *over]), tmp_path / "tags")
    state = read_checkpoint_weights(latest_checkpoint(tmp_path / "tags"))
    tok = Tokenizer.load(tiny_world / "tokenizer.json")
    counted = set(state["token_captions"].nonzero().flatten().tolist())
    shapes = {i for w in SHAPES for i in tok.encode(" " + w)}
    colours = {i for w in COLOURS for i in tok.encode(" " + w)}
    places = {i for p in POSITIONS for w in p.split() for i in tok.encode(" " + w)}
    numbers = {i for w in NUMBERS[1:6] for i in tok.encode(" " + w)}
    backgrounds = {i for w in BACKGROUND_WORDS.values() for i in tok.encode(" " + w)}
    tags = shapes | colours | places | numbers | backgrounds
    assert counted <= tags, [tok.decode([i]) for i in counted - tags]
    assert all(counted & group for group in (shapes, colours, places, numbers, backgrounds))
    assert float(state["captions_seen"]) >= 3 * 8
