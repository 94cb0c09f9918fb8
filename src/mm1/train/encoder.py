"""Stage `encoder`: pre-train the image encoder on caption data before the MLLM sees it (MM1 §3.1).

Three families, chosen by `train.encoder_objective`:
- contrastive, `clip` (softmax over the batch, both directions) or `siglip` (pairwise sigmoid with
  a learned bias): the ViT is paired with a small text tower (a bidirectional transformer over the
  world tokenizer's ids, mean-pooled) and both are projected into a shared space;
- reconstructive, `aim` (AIM): the ViT runs with a prefix-causal mask over its patches (a random
  prefix attends bidirectionally, the rest causally) and an MLP head predicts the next patch's
  per-patch-normalised pixels, MSE on the non-prefix patches;
- classification, `superclass` (SuperClass, Huang et al. 2024): no text tower; a linear classifier on
  the mean-pooled ViT features predicts which vocabulary tokens the image's caption contains, softmax
  cross-entropy (over the words training captions have contained) against the caption's multi-hot,
  IDF-weighted and normalised. Every word is a fixed
  class from the first step, where a contrastive text tower learns its targets beside the ViT
  (docs/grounding.md section 15 measures both on the world). The IDF statistics are counted online
  over the training captions seen (buffers, so checkpoints and resumes carry them).
Contrastive objectives can add *hard negative* captions (NegCLIP, Yuksekgonul et al. 2023): each
caption with the words of a `train.hard_negatives` group swapped among themselves ("a red circle" ->
"a red star"). In-batch negatives of the synthetic world differ in colour far more often than in
shape, so without them the encoder learns colour and ignores shape (docs/grounding.md: linear shape
probe at chance); a swapped caption can only be told apart by looking at the shape.
The ViT is the same module class as `MLLM.vision` and its weights sit under `vision.` in the
checkpoint, so a pretrain run with `train.init_from=<encoder run>` starts from exactly these.
Contrastive losses gather features over ranks, so N processes see the same negatives as one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mm1.config import Config
from mm1.models.attention import sdpa
from mm1.models.registry import ENCODERS
from mm1.registry import ConfigError
from mm1.train.distributed import DistEnv, all_reduce_sum, gather_with_grad
from mm1.train.objective import ObjectiveOutput

OBJECTIVES = ("clip", "siglip", "aim", "superclass")  # train.encoder_objective


class TextTower(nn.Module):
    """A small bidirectional transformer over token ids; mean pooling over the valid tokens."""

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, max_len: int, out_dim: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.empty(1, max_len, dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's own init of every layer, as at construction, plus small random positions."""
        nn.init.normal_(self.pos, std=0.01)
        for m in (self.tok, *self.layers, self.norm, self.proj):
            _reset_tree(m)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos[:, : ids.shape[1]]  # [N, L, D]
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~valid)
        x = self.norm(x)
        w = valid.unsqueeze(-1).to(x.dtype)
        return self.proj((x * w).sum(1) / w.sum(1).clamp(min=1))  # [N, out]


def caption_pairs(
    batch: dict[str, torch.Tensor], image_id: int, tokens_per_image: int, special: set[int], max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images [N,3,H,W], text ids [N,L], valid [N,L]) from a packed caption batch.

    Each image is paired with the non-special tokens of its own document (packed rows hold many
    caption documents; doc_ids separate them), so no data-format knowledge beyond the batch table."""
    ids, docs, images = batch["input_ids"], batch["doc_ids"], batch["images"]
    slot_pos = (ids == image_id).nonzero()  # [S, 2] row-major, k per image
    first = slot_pos[::tokens_per_image]  # [N, 2] first slot of each image
    if first.shape[0] != images.shape[0]:
        raise ValueError(
            f"encoder stage: {images.shape[0]} images but {first.shape[0]} slot runs of "
            f"{tokens_per_image}; sub-image grids are not supported here (set model.subimage_grid=0)"
        )
    keep = torch.ones_like(ids, dtype=torch.bool)
    for s in special:
        keep &= ids != s
    texts = []
    for b, t in first.tolist():
        row = ids[b][(docs[b] == docs[b, t]) & keep[b]][:max_len]
        texts.append(row)
    n, length = len(texts), max(1, max((len(r) for r in texts), default=1))
    out = torch.zeros(n, length, dtype=torch.long)
    valid = torch.zeros(n, length, dtype=torch.bool)
    for i, r in enumerate(texts):
        out[i, : len(r)] = r
        valid[i, : len(r)] = True
    valid[:, 0] = True  # an empty caption still pools one (pad) token rather than dividing by zero
    return images, out, valid


class WordSwapper:
    """Makes hard negative captions: token ids of each word group (single-token words, with and
    without a leading space) are replaced by another word of the same group, a random non-zero
    cyclic shift per caption. Groups whose words are not single tokens are skipped."""

    def __init__(self, groups: list[list[str]], encode) -> None:
        self.groups: list[list[int]] = []
        for words in groups:
            for form in (" {}", "{}"):
                ids = [encode(form.format(w)) for w in words]
                if len(words) > 1 and all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids):
                    self.groups.append([i[0] for i in ids])

    def __call__(
        self, ids: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative ids [N, L], changed [N]: whether a caption had any word to swap)."""
        out = ids.clone()
        for group in self.groups:
            table = torch.tensor(group, device=ids.device)
            n = len(group)
            shift = torch.randint(1, n, (ids.shape[0], 1), generator=generator).to(ids.device)  # [N, 1]
            hit = torch.isin(ids, table)  # [N, L]
            pos = (ids.unsqueeze(-1) == table).float().argmax(-1)  # [N, L] index within the group
            out = torch.where(hit, table[(pos + shift) % n], out)
        return out, (out != ids).any(1)


def word_group_ids(groups: list[list[str]], encode, key: str) -> list[list[int]]:
    """Each group's words as token ids (with the leading space a caption's words carry); a word that is not
    one token of the tokenizer is refused, since a class must be one vocabulary row."""
    out = []
    for words in groups:
        ids = [encode(" " + w) for w in words]
        bad = [w for w, i in zip(words, ids) if len(i) != 1]
        if bad or len(words) < 2:
            problem = f"{bad} are not single tokens of the tokenizer" if bad else "a group needs two words or more"
            raise ConfigError(f"{key}: {words}: {problem}")
        out.append([i[0] for i in ids])
    return out


def clip_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: torch.Tensor,
    neg: torch.Tensor | None = None,
    neg_ok: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE; with hard negative captions `neg` [M, E], images also have to reject those
    (columns where `neg_ok` is False, captions with nothing swapped, are left out)."""
    logits = scale * img @ txt.T  # [N, N]
    labels = torch.arange(img.shape[0], device=img.device)
    i2t = logits
    if neg is not None:
        hard = (scale * img @ neg.T).masked_fill(~neg_ok[None, :], float("-inf"))  # [N, M]
        i2t = torch.cat([logits, hard], dim=1)
    return 0.5 * (F.cross_entropy(i2t, labels) + F.cross_entropy(logits.T, labels))


def siglip_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    neg: torch.Tensor | None = None,
    neg_ok: torch.Tensor | None = None,
) -> torch.Tensor:
    logits = scale * img @ txt.T + bias  # [N, N]
    signs = 2 * torch.eye(img.shape[0], device=img.device) - 1
    loss = -F.logsigmoid(signs * logits).sum()
    if neg is not None:  # every (image, swapped caption) pair is a negative
        hard = -F.logsigmoid(-(scale * img @ neg.T + bias))  # [N, M]
        loss = loss + (hard * neg_ok[None, :].to(hard.dtype)).sum()
    return loss / img.shape[0]


def caption_multi_hot(ids: torch.Tensor, valid: torch.Tensor, vocab_size: int, special: set[int]) -> torch.Tensor:
    """[N, V] bool: which token ids occur among each caption's valid tokens, special tokens (the pad an
    empty caption pools) never."""
    hot = torch.zeros(ids.shape[0], vocab_size, dtype=torch.bool, device=ids.device)
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
    hot[rows[valid], ids[valid]] = True
    hot[:, [s for s in special if 0 <= s < vocab_size]] = False
    return hot


LSE_SHARPNESS = 5.0  # r of log-sum-exp pooling: 0 -> the mean of the tokens' logits, infinity -> their max


def pooled_logits(
    classifier: nn.Linear, tokens: torch.Tensor, pool: str, classes: torch.Tensor | None = None
) -> torch.Tensor:
    """[N, C] image logits from [N, T, D] ViT tokens, for the classifier's rows `classes` (all V when
    None). "mean": the classifier on the mean token (the mean of per-token logits). "lse": log-sum-exp
    of per-token logits, (1/r) log mean_t exp(r z_t), between their mean and their max (Pinheiro &
    Collobert 2015): a class scores where some token shows it, so each token must say what is *there*,
    not what is in the image, and the tokens the connector passes on keep where things are."""
    weight, bias = classifier.weight, classifier.bias
    if classes is not None:
        weight, bias = weight[classes], None if bias is None else bias[classes]
    if pool == "mean":
        return F.linear(tokens.mean(1), weight, bias).float()
    logits = F.linear(tokens, weight, bias)  # [N, T, C]
    return (TokenLogSumExp.apply(logits, LSE_SHARPNESS) - math.log(tokens.shape[1])) / LSE_SHARPNESS


class TokenLogSumExp(torch.autograd.Function):
    """log sum_t exp(r z_t) over dim 1 of [N, T, V] logits z (any float dtype) -> [N, V] in float32 (or z's
    dtype if wider).

    The same value and gradient as `torch.logsumexp(r * z.float(), 1)`, in fewer passes over the
    [N, T, V] tensor, the encoder stage's largest (50 images x 64 tokens x 2,048 classes): the forward
    keeps the softmax weights over t, so the backward is one multiply where autograd's chain (the
    logsumexp, the scale, the dtype cast) re-reads and re-exponentiates the logits; about a fifth of a
    tiny-preset encoder step (benchmarks/RESULTS.md, Profile findings)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, r: float) -> torch.Tensor:  # noqa: ANN001  (autograd's ctx)
        w = z.to(torch.promote_types(z.dtype, torch.float32), copy=True).mul_(r)  # [N, T, V], never z itself
        top = w.amax(1, keepdim=True)
        w.sub_(top).exp_()
        total = w.sum(1, keepdim=True)
        w.div_(total)  # softmax over the tokens: d lse / d (r z)
        ctx.save_for_backward(w)
        ctx.r, ctx.dtype = r, z.dtype
        return total.log_().add_(top).squeeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        (w,) = ctx.saved_tensors
        return (w * (grad * ctx.r).unsqueeze(1)).to(ctx.dtype), None


def superclass_loss(logits: torch.Tensor, hot: torch.Tensor, idf: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy against each caption's IDF-weighted multi-hot, normalised to sum to one,
    summed over the captions; captions whose every token has zero weight add nothing."""
    target = hot.to(logits.dtype) * idf
    target = target / target.sum(1, keepdim=True).clamp(min=1e-12)
    return -(target * F.log_softmax(logits, dim=-1)).sum()


def group_loss(logits: torch.Tensor, hot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, correct, counted) of one word group's own softmax ([N, G] logits against
    [N, G] multi-hot): `superclass_loss` with every word weighted alike, so captions without a word of
    the group add nothing; `correct` counts those with one whose top class is theirs."""
    rows = hot.any(1)
    loss = superclass_loss(logits, hot, torch.ones(hot.shape[1], dtype=logits.dtype, device=logits.device))
    with torch.no_grad():
        correct = hot[rows].gather(1, logits[rows].argmax(1, keepdim=True)).sum()
    return loss, correct, rows.sum()


def word_recall(logits: torch.Tensor, hot: torch.Tensor) -> torch.Tensor:
    """Share of each caption's k distinct tokens found among the classifier's top k, over the batch."""
    k = hot.sum(1)
    top = logits.topk(int(k.max().clamp(min=1))).indices
    hit = hot.gather(1, top) & (torch.arange(top.shape[1], device=top.device) < k.unsqueeze(1))
    return hit.sum() / k.sum().clamp(min=1)


def _block_forward(block: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A ViT block with an attention mask (the block's own forward is bidirectional)."""
    b, t, d = x.shape
    q, k, v = block.qkv(block.ln1(x)).view(b, t, 3, block.heads, d // block.heads).permute(2, 0, 3, 1, 4)
    a = sdpa(q, k, v, attn_mask=mask)  # [B, H, T, hd]
    x = x + block.proj(a.transpose(1, 2).reshape(b, t, d))
    return x + block.fc2(block.act(block.fc1(block.ln2(x))))


def _reset_tree(module: nn.Module) -> None:
    """Re-run torch's initialisation of `module` and everything in it, children first, as construction
    does (nn.MultiheadAttention zeroes its out_proj bias after the Linear drew one)."""
    for child in module.children():
        _reset_tree(child)
    for name in ("reset_parameters", "_reset_parameters"):
        if callable(getattr(module, name, None)):
            getattr(module, name)()
            break


# the learned logit temperature (and SigLIP's bias) at the start: SigLIP t = 10, b = -10; CLIP t = 1 / 0.07
LOGIT_INIT = {"siglip": (math.log(10.0), -10.0), "clip": (math.log(1 / 0.07), None)}


class EncoderPretrainer(nn.Module):
    """The ViT plus what its objective needs; `forward(batch)` returns the stage loss. A contrastive or
    AIM loss is a mean over its micro-batch (contrastive pairs are not independent), so a micro-batch
    is one unit (`mm1.train.objective`); SuperClass's captions are independent, so its loss is a sum
    and each image is a unit, and N ranks average exactly as one process would. Built like the MLLM
    (on the meta device, then materialised by `mm1.train.materialise`), so `reset_parameters` is the
    one definition of its initial weights."""

    def __init__(self, cfg: Config, vocab_size: int, special_ids: set[int], env: DistEnv, encode=None) -> None:
        super().__init__()
        v = cfg.model.vision
        self.objective = cfg.train.encoder_objective
        self.pool = cfg.train.superclass_pool
        self.image_id, self.k = cfg.model.image_token_id, cfg.model.tokens_per_image
        self.special, self.env = set(special_ids), env
        self.vision = ENCODERS.get(v.kind)(v)
        self.max_len = min(cfg.data.seq_len, 128)
        if self.objective == "aim":
            p = v.patch_size
            self.head = nn.Sequential(nn.Linear(v.width, v.mlp_dim), nn.GELU(), nn.Linear(v.mlp_dim, 3 * p * p))
        elif self.objective == "superclass":
            self.classifier = nn.Linear(v.width, vocab_size)
            groups = cfg.train.superclass_groups
            # (no `encode`, as in unit tests that build the module by hand: no tokenizer, so no groups)
            self.groups = word_group_ids(groups, encode, "train.superclass_groups") if groups and encode else []
            self.group_weight = cfg.train.superclass_group_weight
            # captions counted and, per token, captions containing it: the online IDF
            self.register_buffer("captions_seen", torch.zeros((), dtype=torch.float64))
            self.register_buffer("token_captions", torch.zeros(vocab_size, dtype=torch.float64))
        else:
            dim = min(v.width, 512)
            self.text = TextTower(vocab_size, dim, max(2, min(6, v.depth // 2)), max(1, dim // 64), self.max_len, dim)
            self.image_proj = nn.Linear(v.width, dim, bias=False)
            scale, bias = LOGIT_INIT[self.objective]
            self.logit_scale = nn.Parameter(torch.tensor(scale))
            if bias is not None:
                self.logit_bias = nn.Parameter(torch.tensor(bias))
        groups = cfg.train.hard_negatives if self.objective in ("clip", "siglip") else []
        self.swapper = WordSwapper(groups, encode) if groups and encode is not None else None

    def reset_parameters(self) -> None:
        self.vision.reset_parameters()
        if self.objective == "aim":
            _reset_tree(self.head)
            return
        if self.objective == "superclass":
            self.classifier.reset_parameters()
            with torch.no_grad():
                self.captions_seen.zero_()
                self.token_captions.zero_()
            return
        self.text.reset_parameters()
        self.image_proj.reset_parameters()
        scale, bias = LOGIT_INIT[self.objective]
        with torch.no_grad():
            self.logit_scale.fill_(scale)
            if bias is not None:
                self.logit_bias.fill_(bias)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["images"].shape[0]) if self.objective == "superclass" else 1

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        if self.objective == "aim":
            return ObjectiveOutput(loss_sum=self.aim_loss(batch["images"]), metrics={})
        images, ids, valid = caption_pairs(batch, self.image_id, self.k, self.special, self.max_len)
        dev = images.device
        if self.objective == "superclass":
            return self.superclass_forward(images, ids.to(dev), valid.to(dev))
        img = F.normalize(self.image_proj(self.vision(images).mean(1)), dim=-1)  # [N, E]
        txt = F.normalize(self.text(ids.to(dev), valid.to(dev)), dim=-1)  # [N, E]
        img, txt = gather_with_grad(img.float(), self.env), gather_with_grad(txt.float(), self.env)
        neg = neg_ok = None
        if self.swapper is not None:
            neg_ids, changed = self.swapper(ids)
            neg = gather_with_grad(F.normalize(self.text(neg_ids.to(dev), valid.to(dev)), dim=-1).float(), self.env)
            neg_ok = gather_with_grad(changed.to(dev).float(), self.env) > 0
        scale = self.logit_scale.exp().clamp(max=100.0)
        if self.objective == "siglip":
            loss = siglip_loss(img, txt, scale, self.logit_bias, neg, neg_ok)
        else:
            loss = clip_loss(img, txt, scale, neg, neg_ok)
        with torch.no_grad():
            acc = ((img @ txt.T).argmax(-1) == torch.arange(img.shape[0], device=dev)).float().mean()
        return ObjectiveOutput(loss_sum=loss, metrics={"retrieval_acc": acc})

    def superclass_forward(self, images: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> ObjectiveOutput:
        hot = caption_multi_hot(ids, valid, self.classifier.out_features, self.special)
        if self.training:  # the IDF counts grow with every training caption, summed over ranks
            with torch.no_grad():
                n = torch.tensor([float(len(hot))], device=hot.device, dtype=torch.float64)
                counts = all_reduce_sum(torch.cat([hot.sum(0, dtype=torch.float64), n]), self.env)
                self.token_captions += counts[:-1].to(self.token_captions.device)
                self.captions_seen += counts[-1].to(self.captions_seen.device)
        idf = torch.log(self.captions_seen.clamp(min=1) / (1 + self.token_captions)).clamp(min=0)
        idf = idf.float().to(hot.device)
        # Only a word some caption contained can be a target; the softmax runs over those (a few dozen tags
        # of a 2,048-token vocabulary), not the whole vocabulary: the per-token logits and their pooling
        # were the encoder step's largest tensors. The never-seen rows would only be pushed ever lower.
        seen = (self.token_captions > 0).to(hot.device) | hot.any(0)
        grouped = [torch.tensor(g, device=hot.device) for g in self.groups]  # each its own softmax
        for g in grouped:
            seen[g] = False
        classes = torch.cat([seen.nonzero().squeeze(1), *grouped])
        logits = pooled_logits(self.classifier, self.vision(images), self.pool, classes)  # [N, C]
        n = len(classes) - sum(len(g) for g in grouped)  # the first n columns share the main softmax
        main, main_hot = logits[:, :n], hot[:, classes[:n]]
        loss = superclass_loss(main, main_hot, idf[classes[:n]])
        metrics = {}
        with torch.no_grad():
            metrics["word_recall"] = word_recall(main, main_hot & (idf[classes[:n]] > 0))
        correct = counted = torch.zeros((), device=hot.device)
        for g in grouped:
            part, right, rows = group_loss(logits[:, n : n + len(g)], hot[:, g])
            loss, correct, counted, n = loss + self.group_weight * part, correct + right, counted + rows, n + len(g)
        if grouped:  # the share of images whose group word (e.g. background) the group's softmax picks
            metrics["group_accuracy"] = correct / counted.clamp(min=1)
        return ObjectiveOutput(loss_sum=loss, metrics=metrics)

    def aim_loss(self, pixels: torch.Tensor) -> torch.Tensor:
        vit, p = self.vision, self.vision.cfg.patch_size
        n = pixels.shape[0]
        x = vit.embed_patches(pixels)  # [N, D, h, w]
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [N, P, D]
        if vit.cls_token is not None:
            x = torch.cat([vit.cls_token.expand(n, -1, -1).to(x.dtype), x], dim=1)
        x = x + vit.position_embeddings(h, w).to(x.dtype)
        if vit.pre_norm is not None:
            x = vit.pre_norm(x)
        n_patches, pre = h * w, vit.n_prefix
        prefix = int(torch.randint(1, n_patches, (1,)))  # AIM: a random bidirectional prefix
        t = pre + n_patches
        idx = torch.arange(t, device=x.device)
        mask = (idx[None, :] <= idx[:, None]) | (idx[None, :] < pre + prefix)  # [T, T] prefix-causal
        for block in vit.blocks:
            x = _block_forward(block, x, mask)
        if vit.post_norm is not None:
            x = vit.post_norm(x)
        feats = x[:, pre:]  # [N, P, D]
        target = pixels.float().unfold(2, p, p).unfold(3, p, p)  # [N, 3, h, w, p, p]
        target = target.permute(0, 2, 3, 1, 4, 5).reshape(n, n_patches, 3 * p * p)  # [N, P, 3p²]
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        pred = self.head(feats[:, prefix - 1 : -1]).float()  # position t predicts patch t+1
        return F.mse_loss(pred, target[:, prefix:])
