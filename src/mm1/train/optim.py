"""Optimiser and learning-rate schedule, with MM1's learning-rate law as the default.

MM1 fitted the peak LR of its pre-training grid (9M, 85M, 302M and 1.2B parameters) to
η(N) = exp(−0.4214·ln N − 0.5535) and set the weight decay to λ = 0.1·η. A user who does not set
`train.lr` gets that law for the N of *their* model, so a tiny run and a 30B run are both started at
a sensible rate.

λ is a *decoupled* decay: each step multiplies a decayed weight by (1 − λ·s_t), s_t the schedule's
multiplier, whatever η is. torch's AdamW multiplies its `weight_decay` by the current LR η·s_t, so it
is given λ / η (0.1 under the law); passing λ itself would decay by λ·η·s_t, i.e. not at all. This
file is the only place the law lives; N is the number of distinct trainable
parameters (tied weights counted once, frozen parts excluded), and the trainer logs both.

The law is a *pre-training* law. SFT starts from weights that already read the image and runs at a
fraction of it, `train.sft_lr_scale` (default 0.17: MM1 fine-tuned its 3B model at 1e-5 [secondary
source], 0.17x the law's 5.8e-5 there). At the law's own rate, SFT of the tiny model unlearns its
grounding (docs/grounding.md: single-world colour questions 76 % at 1x, 100 % at 0.17x).
`train.lr_scale` multiplies the law in any stage, for a stage it was not fitted to (the demo's
SuperClass encoder learns shape within its 900 steps only at 2x).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mm1.config import TrainConfig
from mm1.registry import ConfigError

LAW_SLOPE = -0.4214
LAW_INTERCEPT = -0.5535
WD_RATIO = 0.1

# parameters that should not be pulled towards zero: gains, biases, learned positions/queries/tokens
_NO_DECAY = re.compile(
    r"(^|\.)(bias|.*norm.*|pos_embed.*|position_embedding.*|cls.*|class_embedding.*|"
    r"logit_scale|logit_bias|queries|query_tokens|mask_token)(\.|$)",
    re.IGNORECASE,
)


def mm1_lr(n_params: int, slope: float = LAW_SLOPE, intercept: float = LAW_INTERCEPT) -> float:
    """Peak learning rate exp(slope·ln N + intercept); the defaults are MM1's law."""
    if n_params <= 0:
        raise ValueError(f"the MM1 LR law needs a positive parameter count, got {n_params}")
    return math.exp(slope * math.log(n_params) + intercept)


def read_lr_law(path: str) -> tuple[float, float, float]:
    """(a, b, weight-decay ratio) of an `lr_law.json` written by `mm1 hparams`."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"train.lr_law={path!r}: no such file; `mm1 hparams` writes one (lr_law.json)")
    try:
        law = json.loads(file.read_text())
        return float(law["a"]), float(law["b"]), float(law.get("wd_ratio", WD_RATIO))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"train.lr_law={path!r}: expected JSON with numbers 'a' and 'b' (log lr = a ln N + b), got an error: {e}"
        ) from None


def count_trainable(model: nn.Module) -> int:
    """Distinct trainable parameters; tied weights (same tensor) are counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@dataclass
class LRChoice:
    """The peak LR and weight decay in use, and where each came from (for the run log)."""

    lr: float
    weight_decay: float  # λ: the decoupled per-step decay at the schedule's peak
    n_params: int
    lr_source: str  # "config" | "mm1_law" | "lr_law"
    wd_source: str  # "config" | "<ratio>*lr"
    lr_scale: float = 1.0  # the law's value was multiplied by this (train.lr_scale, x train.sft_lr_scale at stage=sft)

    @property
    def torch_weight_decay(self) -> float:
        """What torch AdamW gets so that its per-step decay lr_t·wd equals λ·s_t: λ / η_peak."""
        if self.weight_decay == 0.0:
            return 0.0
        if self.lr <= 0.0:
            raise ConfigError(
                f"train.weight_decay={self.weight_decay:g} needs a positive peak LR (got "
                f"train.lr={self.lr:g}): the decay is applied as λ/η by AdamW; set train.lr > 0"
            )
        return self.weight_decay / self.lr

    def describe(self) -> str:
        law = "fitted law train.lr_law" if self.lr_source == "lr_law" else "MM1 law"
        lr_how = (
            "train.lr" if self.lr_source == "config" else f"{law} eta(N) for N={self.n_params:,} trainable parameters"
        )
        if self.lr_scale != 1.0:
            lr_how += f" x {self.lr_scale:g} (train.lr_scale x train.sft_lr_scale at stage=sft)"
        wd_how = "train.weight_decay" if self.wd_source == "config" else self.wd_source.replace("*", " * ")
        return (
            f"peak lr {self.lr:.4g} ({lr_how}); decoupled weight decay {self.weight_decay:.4g} per step "
            f"({wd_how}; torch AdamW weight_decay {self.torch_weight_decay:.4g})"
        )


def resolve_lr(cfg: TrainConfig, n_params: int) -> LRChoice:
    """Peak LR and weight decay: the config's values where set, else a fitted law from `train.lr_law`
    (`mm1 hparams`), else the MM1 law for `n_params`, times `train.lr_scale` and, at stage=sft,
    `train.sft_lr_scale`."""
    slope, intercept, wd_ratio, source = LAW_SLOPE, LAW_INTERCEPT, WD_RATIO, "mm1_law"
    if cfg.lr_law:
        slope, intercept, wd_ratio = read_lr_law(cfg.lr_law)
        source = "lr_law"
    scale = 1.0 if cfg.lr is not None else cfg.lr_scale * (cfg.sft_lr_scale if cfg.stage == "sft" else 1.0)
    lr = cfg.lr if cfg.lr is not None else scale * mm1_lr(n_params, slope, intercept)
    wd = cfg.weight_decay if cfg.weight_decay is not None else wd_ratio * lr
    return LRChoice(
        lr,
        wd,
        n_params,
        "config" if cfg.lr is not None else source,
        "config" if cfg.weight_decay is not None else f"{wd_ratio:g}*lr",
        scale,
    )


PARTS = ("lm", "connector", "vision")  # the MLLM's parts; the first group is the LM's (the logged lr)


def _part(name: str) -> str:
    """Which MLLM part a parameter belongs to ('other' for e.g. the encoder stage's text tower)."""
    pieces = name.split(".")
    return next((p for p in PARTS if p in pieces), "other")


def param_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None, lr_mult: object | None = None
) -> list[dict]:
    """AdamW groups: matrices decay; biases, norm gains and learned positions/queries do not. With
    `lr_mult` (train.lr_mult) each part gets its own pair at lr x its multiplier, and weight decay /
    multiplier, so the per-step decay (lr x weight_decay) does not change with the multiplier.

    `weight_decay` is torch's coefficient (`LRChoice.torch_weight_decay`), not λ."""
    mult = {p: float(getattr(lr_mult, p, 1.0)) for p in PARTS} if lr_mult is not None else {}
    split = any(m != 1.0 for m in mult.values())
    buckets: dict[tuple[str, bool], list] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        part = _part(name) if split else "all"
        buckets.setdefault((part, p.ndim >= 2 and not _NO_DECAY.search(name)), []).append(p)
    groups = []
    for part in (*PARTS, "other") if split else ("all",):
        m = mult.get(part, 1.0)
        for decay in (True, False):
            if buckets.get((part, decay)):
                g = {
                    "params": buckets[(part, decay)],
                    "weight_decay": weight_decay / m if decay else 0.0,
                    "name": ("decay" if decay else "no_decay") + ("" if part == "all" else f"/{part}"),
                }
                if lr is not None:
                    g["lr"] = lr * m
                groups.append(g)
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, choice: LRChoice) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel on CUDA, the multi-tensor (foreach) one elsewhere."""
    groups = param_groups(model, choice.torch_weight_decay, choice.lr, cfg.lr_mult)
    if not groups:
        raise ValueError(
            "no trainable parameters: every part is frozen (check train.freeze_vision, "
            "train.freeze_connector, train.freeze_lm)"
        )
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    kwargs = {"fused": True} if on_cuda else {"foreach": True}
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    return torch.optim.AdamW(groups, lr=choice.lr, betas=betas, eps=1e-8, **kwargs)


class WarmupCosine:
    """LR multiplier at optimizer step s (0-based): linear warmup to 1, cosine down to `min_ratio`.

    Step `warmup-1` runs at the peak, the last step at the floor (MM1: 2k warmup, 10 % floor).
    A plain object (not a closure) so LambdaLR's state_dict stays plain data."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup = max(0, int(warmup))
        self.total = max(1, int(total))
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        decay_steps = self.total - self.warmup
        if decay_steps <= 1:
            return 1.0
        t = min(1.0, (step - self.warmup) / (decay_steps - 1))  # 0 at the peak, 1 at the last step
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class WarmupStableDecay:
    """LR multiplier at optimizer step s: linear warmup to 1, flat at the peak, then a linear decay to
    `min_ratio` over the last `decay_fraction` of the run (warmup-stable-decay, as MiniCPM).

    Why beside cosine: a fixed short budget spends most of its steps near the peak instead of on the
    cosine's long tail, and the final decay still anneals. Step `total-1` runs at the floor."""

    def __init__(self, warmup: int, total: int, min_ratio: float, decay_fraction: float) -> None:
        self.warmup = max(0, int(warmup))
        self.total = max(1, int(total))
        self.min_ratio = float(min_ratio)
        self.decay_steps = min(self.total - self.warmup, max(1, round(decay_fraction * self.total)))

    @property
    def decay_start(self) -> int:
        """The first step of the decay."""
        return self.total - self.decay_steps

    def end_at(self, total: int, decay_start: int) -> None:
        """Make step `total - 1` the last, decaying from `decay_start` (a time budget decides both
        while the run goes, `mm1.train.budget`); a decay that has already begun keeps its start."""
        start = min(decay_start, self.decay_start)
        self.total = max(1, int(total))
        self.decay_steps = max(1, self.total - start)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        start = self.decay_start
        if step < start or self.decay_steps <= 1:
            return 1.0
        t = min(1.0, (step - start + 1) / self.decay_steps)  # 1 at the last step
        return 1.0 - (1.0 - self.min_ratio) * t


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`train.schedule` over `train.steps`; warmup is capped at the run length so short runs peak."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    if cfg.schedule == "wsd":
        fn: WarmupCosine | WarmupStableDecay = WarmupStableDecay(
            warmup, cfg.steps, cfg.min_lr_ratio, cfg.decay_fraction
        )
    else:
        fn = WarmupCosine(warmup, cfg.steps, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
