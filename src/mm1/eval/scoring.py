"""Log-likelihood scoring: multiple choice by the most likely option, text by perplexity.

Generation is the wrong tool for multiple choice: a small model's free text rarely spells an option
exactly. Instead each option is appended to the prompt and the summed log-probability of its tokens
is compared (lm-eval-harness style; `normalize="length"` divides by the option's token count).
Context and continuation are tokenised separately and concatenated, so every option is scored
after the same context tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mm1.data.tokenizer import Tokenizer
from mm1.eval.generate import ImageSource, PromptLike, encode_prompt, image_batch, left_pad


@torch.no_grad()
def continuation_logprobs(
    model,
    tokenizer: Tokenizer,
    contexts: list[PromptLike],
    continuations: list[str],
    images: list[Sequence[ImageSource]] | None = None,
    batch_size: int = 16,
    add_bos: bool = False,
    prefix: Sequence[int] = (),
) -> list[tuple[float, int]]:
    """(sum of log p(continuation token | everything before), number of continuation tokens) per row.
    `prefix` ids go before every context (e.g. EOS as a document start for perplexity). A context
    may be a conversation: the continuation is then scored as the assistant's reply."""
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    images = images if images is not None else [[] for _ in contexts]
    cfg = model.cfg
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[tuple[float, int]] = []
    try:
        for s in range(0, len(contexts), max(1, batch_size)):
            ctx = [
                list(prefix) + encode_prompt(tokenizer, c, cfg.tokens_per_image, add_bos)
                for c in contexts[s : s + batch_size]
            ]
            cont = [tokenizer.encode(c) for c in continuations[s : s + batch_size]]
            for n, (a, c) in enumerate(zip(ctx, cont)):
                if not c or not a:
                    raise ValueError(
                        f"row {s + n}: continuation {continuations[s + n]!r} needs a non-empty context "
                        "and at least one token"
                    )
            ids, mask = left_pad([a + b for a, b in zip(ctx, cont)], tokenizer.pad_id)
            pixels = torch.cat([image_batch(cfg, imgs) for imgs in images[s : s + batch_size]]).to(device)
            logits = model(
                ids.to(device), pixels if pixels.shape[0] else None, attention_mask=mask.to(device)
            ).logits.float()  # [B, T, V]
            logp = F.log_softmax(logits[:, :-1], dim=-1)  # [B, T-1, V]: predicts token t+1
            tok_lp = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
            for i, c in enumerate(cont):
                results.append((float(tok_lp[i, -len(c) :].sum()), len(c)))
    finally:
        model.train(was_training)
    return results


def choose_options(
    model,
    tokenizer: Tokenizer,
    prompt: str,
    options: list[str],
    images: Sequence[ImageSource],
    normalize: str = "none",
    add_bos: bool = False,
) -> tuple[int, list[float]]:
    """Index of the most likely option after `prompt` (each option preceded by a space), and the
    scores. `normalize`: "none" (sum of log-probs) or "length" (mean per token)."""
    scores = continuation_logprobs(
        model,
        tokenizer,
        [prompt] * len(options),
        [" " + o for o in options],
        [list(images)] * len(options),
        batch_size=len(options),
        add_bos=add_bos,
    )
    vals = [lp / n if normalize == "length" else lp for lp, n in scores]
    return max(range(len(vals)), key=lambda i: vals[i]), vals


def perplexity(model, tokenizer: Tokenizer, texts: list[str], batch_size: int = 16) -> tuple[float, list[float]]:
    """Corpus perplexity exp(total NLL / total tokens) of `texts` (each scored from its first token
    on, after an EOS: training separates documents by EOS), and the per-text NLL sums."""
    return corpus_perplexity(text_logprobs(model, tokenizer, texts, batch_size))


def text_logprobs(model, tokenizer: Tokenizer, texts: list[str], batch_size: int = 16) -> list[tuple[float, int]]:
    """(log-probability, tokens) of each text, scored after an EOS."""
    return continuation_logprobs(
        model, tokenizer, [""] * len(texts), texts, batch_size=batch_size, prefix=[tokenizer.eos_id]
    )


def corpus_perplexity(scored: list[tuple[float, int]]) -> tuple[float, list[float]]:
    """(exp(total NLL / total tokens), per-text NLL sums) from `text_logprobs` output."""
    total_nll = -sum(lp for lp, _ in scored)
    total_tokens = sum(n for _, n in scored)
    return math.exp(total_nll / max(total_tokens, 1)), [-lp for lp, _ in scored]
