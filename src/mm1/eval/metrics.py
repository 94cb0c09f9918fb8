"""Evaluation metrics, each a plain function equal to its reference implementation.

- `cider` / `cider_scores`: CIDEr-D exactly as pycocoevalcap's `Cider` computes it (tested to 1e-9
  on random corpora), reported x100 as papers do. The quirks that make it CIDEr-*D* are kept on
  purpose: document frequencies come from the references of the evaluated images only (so a score
  depends on the evaluated set), idf = ln N - ln max(1, df), tf-idf vectors per n-gram order 1..4,
  the candidate's weights clipped at the reference's, a Gaussian length penalty (sigma = 6) whose
  "length" is the number of *bigrams*, mean over orders, mean over references, x10.
- `vqa_accuracy`: VQAv2 accuracy, min(#matching annotators / 3, 1) averaged over the 10 leave-one-out
  subsets, with the official answer normalisation (`mm1.eval.vqa_norm`).
- `exact_match`, `option_accuracy`: for single-answer sets (GQA) and multiple choice.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Literal

from mm1.eval.ptb import ptb_tokenize, ptb_tokenize_java
from mm1.eval.vqa_norm import clean_whitespace, normalize_answer, strip_punctuation

Tokenizer = Literal["python", "java", "none"]
MAX_N = 4
SIGMA = 6.0

# ----------------------------------------------------------------------------- CIDEr-D


def _ngrams(sentence: str) -> Counter:
    """Counts of every 1..4-gram of a whitespace-tokenised sentence, in order of appearance."""
    words = sentence.split()
    counts: Counter = Counter()
    for n in range(1, MAX_N + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


class _Vector:
    """tf-idf weights per n-gram order, their L2 norms, and the bigram count used as the length."""

    __slots__ = ("weights", "norms", "length")

    def __init__(self, counts: Counter, idf_of) -> None:
        self.weights: list[dict[tuple, float]] = [{} for _ in range(MAX_N)]
        squares = [0.0] * MAX_N
        self.length = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            w = float(tf) * idf_of(gram)
            self.weights[order][gram] = w
            squares[order] += w * w
            if order == 1:
                self.length += tf
        self.norms = [math.sqrt(s) for s in squares]


def _similarity(hyp: _Vector, ref: _Vector) -> list[float]:
    """Clipped cosine per order times the Gaussian length penalty."""
    penalty = math.exp(-(float(hyp.length - ref.length) ** 2) / (2 * SIGMA**2))
    out = []
    for order in range(MAX_N):
        ref_w = ref.weights[order]
        dot = 0.0
        for gram, w in hyp.weights[order].items():
            r = ref_w.get(gram, 0.0)
            dot += min(w, r) * r
        if hyp.norms[order] != 0 and ref.norms[order] != 0:
            dot /= hyp.norms[order] * ref.norms[order]
        out.append(dot * penalty)
    return out


def _tokenize_all(candidates: dict, references: dict, tokenizer: Tokenizer) -> tuple[dict, dict]:
    if tokenizer == "none":
        return candidates, references
    keys = list(references)
    if tokenizer == "python":
        return (
            {k: ptb_tokenize(candidates[k]) for k in keys},
            {k: [ptb_tokenize(r) for r in references[k]] for k in keys},
        )
    if tokenizer == "java":  # one JVM for the whole corpus
        flat = [candidates[k] for k in keys] + [r for k in keys for r in references[k]]
        toks = iter(ptb_tokenize_java(flat))
        cands = {k: next(toks) for k in keys}
        return cands, {k: [next(toks) for _ in references[k]] for k in keys}
    raise ValueError(f"tokenizer={tokenizer!r}: expected 'python', 'java' or 'none'")


class CiderD:
    """The corpus statistics of a reference set (df over its images, N), reusable to score many
    candidate sets against the same references (e.g. picking the best constant caption).
    Inputs are already tokenised (whitespace-separated tokens)."""

    def __init__(self, references: dict[Hashable, list[str]]) -> None:
        counts = {k: [_ngrams(r) for r in refs] for k, refs in references.items()}
        df: Counter = Counter()
        for per_image in counts.values():
            df.update(set().union(*per_image))
        self._df, self._log_n = df, math.log(float(max(len(counts), 1)))
        self._refs = {k: [_Vector(c, self.idf) for c in per_image] for k, per_image in counts.items()}

    def idf(self, gram: tuple) -> float:
        return self._log_n - math.log(max(1.0, float(self._df.get(gram, 0))))

    def vector(self, candidate: str) -> _Vector:
        return _Vector(_ngrams(candidate), self.idf)

    def score(self, key: Hashable, candidate: str | _Vector) -> float:
        """CIDEr-D x100 of one candidate for image `key`."""
        hyp = candidate if isinstance(candidate, _Vector) else self.vector(candidate)
        refs = self._refs[key]
        total = [0.0] * MAX_N
        for ref in refs:
            total = [a + b for a, b in zip(total, _similarity(hyp, ref))]
        return 100.0 * 10.0 * (sum(total) / MAX_N) / len(refs)


def _check_inputs(candidates: dict, references: dict) -> None:
    if set(candidates) != set(references):
        missing = sorted(map(str, set(references) - set(candidates)))[:5]
        extra = sorted(map(str, set(candidates) - set(references)))[:5]
        raise ValueError(
            f"cider: candidates and references must have the same ids; "
            f"without a candidate: {missing}, without references: {extra}"
        )
    for k, refs in references.items():
        if not isinstance(refs, (list, tuple)) or not refs:
            raise ValueError(f"cider: image {k!r} needs a non-empty list of reference captions, got {refs!r}")
        if not isinstance(candidates[k], str):
            raise ValueError(
                f"cider: the candidate for image {k!r} must be one string, got {type(candidates[k]).__name__}"
            )


def cider_scores(
    candidates: dict[Hashable, str], references: dict[Hashable, list[str]], tokenizer: Tokenizer = "python"
) -> dict[Hashable, float]:
    """Per-image CIDEr-D (x100). `candidates` and `references` must cover the same ids; the corpus
    statistics (df, N) come from these references, as in pycocoevalcap."""
    _check_inputs(candidates, references)
    if not references:
        return {}
    cands, refs = _tokenize_all(candidates, references, tokenizer)
    scorer = CiderD(refs)
    return {k: scorer.score(k, cands[k]) for k in refs}


def cider(
    candidates: dict[Hashable, str], references: dict[Hashable, list[str]], tokenizer: Tokenizer = "python"
) -> float:
    """Corpus CIDEr-D x100 (COCO numbers like 114.6). `tokenizer`: "python" (PTB-like, default),
    "java" (Stanford PTBTokenizer from pycocoevalcap) or "none" (inputs are already tokenised)."""
    scores = cider_scores(candidates, references, tokenizer)
    if not scores:
        raise ValueError("cider: no images to score (empty references)")
    return sum(scores.values()) / len(scores)


# ----------------------------------------------------------------------------- VQA accuracy

VQAMode = Literal["always", "official"]


def vqa_accuracy(prediction: str, answers: list[str], mode: VQAMode = "always") -> float:
    """VQAv2 accuracy of one prediction against its annotators' answers (usually 10), in [0, 1].

    For each annotator i, count the *other* annotators whose answer equals the prediction and score
    min(count / 3, 1); average over i. Modes (both normalise the prediction fully):
    - "always" (default; OpenFlamingo / lmms-eval practice): every reference answer is normalised the
      same way, so "Two" and "2" match whatever the annotators did;
    - "official": GT-Vision-Lab's vqaEval.py verbatim: references are left untouched when all
      annotators agree, and otherwise only lose punctuation (no digit/article/contraction step).
    """
    if not answers:
        raise ValueError("vqa_accuracy: the question has no reference answers")
    pred = normalize_answer(prediction)
    if mode == "always":
        refs = [normalize_answer(a) for a in answers]
    elif mode == "official":
        refs = [strip_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    else:
        raise ValueError(f"vqa_accuracy: mode={mode!r}; expected 'always' or 'official'")
    hits = [r == pred for r in refs]
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3.0) for h in hits) / len(hits)


def exact_match(prediction: str, answer: str | Sequence[str], normalize: bool = True) -> float:
    """1.0 when the prediction equals the (any of the) answer(s); with `normalize`, both go through
    the VQA normalisation first (GQA-style scoring of single-answer sets)."""
    golds = [answer] if isinstance(answer, str) else list(answer)
    if normalize:
        pred, golds = normalize_answer(prediction), [normalize_answer(g) for g in golds]
    else:
        pred, golds = clean_whitespace(prediction), [clean_whitespace(g) for g in golds]
    return float(pred in golds)


def option_accuracy(chosen: Sequence[int], gold: Sequence[int]) -> float:
    """Share of multiple-choice questions whose chosen option index equals the gold index."""
    if len(chosen) != len(gold):
        raise ValueError(f"option_accuracy: {len(chosen)} predictions for {len(gold)} questions")
    if not gold:
        raise ValueError("option_accuracy: no questions")
    return sum(int(c) == int(g) for c, g in zip(chosen, gold)) / len(gold)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation, for the spread over few-shot trials and seeds."""
    if not values:
        raise ValueError("mean_std: no values")
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))
