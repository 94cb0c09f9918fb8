"""The MM1 learning-rate law, the warmup + cosine schedule and AdamW's parameter groups."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from mm1.config import TrainConfig, load_config, preset_path
from mm1.registry import ConfigError
from mm1.train.optim import (
    WarmupCosine,
    WarmupStableDecay,
    build_optimizer,
    build_scheduler,
    count_trainable,
    mm1_lr,
    param_groups,
    resolve_lr,
)


def test_mm1_law_reproduces_the_papers_numbers():
    assert mm1_lr(30e9) == pytest.approx(2.2e-5, rel=0.02)  # the paper: 30B -> 2.2e-5
    assert mm1_lr(1.2e9) == pytest.approx(math.exp(-0.4214 * math.log(1.2e9) - 0.5535), rel=1e-12)
    assert mm1_lr(9e6) > mm1_lr(85e6) > mm1_lr(302e6) > mm1_lr(1.2e9)
    with pytest.raises(ValueError):
        mm1_lr(0)


def test_unset_lr_and_decay_follow_the_law_and_set_values_win():
    auto = resolve_lr(TrainConfig(), 1_000_000)
    assert auto.lr == mm1_lr(1_000_000) and auto.weight_decay == pytest.approx(0.1 * auto.lr)
    assert auto.lr_source == "mm1_law" and "N=1,000,000" in auto.describe()
    fixed = resolve_lr(TrainConfig(lr=3e-4, weight_decay=0.05), 1_000_000)
    assert (fixed.lr, fixed.weight_decay, fixed.lr_source, fixed.wd_source) == (3e-4, 0.05, "config", "config")
    half = resolve_lr(TrainConfig(lr=3e-4), 10)
    assert half.weight_decay == pytest.approx(3e-5)


def test_warmup_is_linear_then_cosine_reaches_the_floor_on_the_last_step():
    f = WarmupCosine(warmup=4, total=20, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    decay = [f(s) for s in range(3, 20)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert f(19) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert f(3 + 8) == pytest.approx(0.1 + 0.9 * 0.5, abs=0.06)  # halfway down the cosine


def test_wsd_holds_the_peak_then_decays_linearly_to_the_floor_over_the_last_fraction():
    f = WarmupStableDecay(warmup=4, total=20, min_ratio=0.1, decay_fraction=0.25)  # decays over steps 15-19
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert all(f(s) == 1.0 for s in range(3, 15))
    decay = [f(s) for s in range(15, 20)]
    assert decay == pytest.approx([1.0 - 0.9 * k / 5 for k in range(1, 6)])
    assert f(19) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def scheduled_lrs(cfg: TrainConfig) -> list[float]:
    """The LR each of `cfg.steps` optimizer steps of a toy model runs at."""
    model = nn.Linear(4, 4)
    opt = build_optimizer(model, cfg, resolve_lr(cfg, count_trainable(model)))
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(cfg.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_schedule_is_chosen_by_name_and_an_unknown_one_is_rejected():
    lrs = scheduled_lrs(TrainConfig(steps=10, warmup_steps=2, lr=1e-3, schedule="wsd", decay_fraction=0.5))
    assert lrs[1:5] == [1e-3] * 4 and lrs[-1] == pytest.approx(1e-4) and lrs[5] < 1e-3
    with pytest.raises(ConfigError, match="train.schedule"):
        load_config(preset_path("tiny"), ["train.schedule=linear"])
    with pytest.raises(ConfigError, match="train.decay_fraction"):
        load_config(preset_path("tiny"), ["train.schedule=wsd", "train.decay_fraction=0"])


def test_scheduler_peaks_at_exactly_the_configured_lr_even_when_the_run_is_shorter_than_warmup():
    assert max(scheduled_lrs(TrainConfig(steps=3, warmup_steps=100, lr=1e-3))) == 1e-3


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_matrices_decay_but_biases_norms_and_positions_do_not_and_frozen_or_tied_are_counted_once():
    m = Toy()
    groups = {g["name"]: g for g in param_groups(m, 0.1)}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["decay"]["params"]) == {id(m.emb.weight), id(m.proj.weight)}
    assert ids(groups["no_decay"]["params"]) == {id(m.pos_embed), id(m.proj.bias), id(m.norm.weight), id(m.norm.bias)}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert count_trainable(m) == 80 + 32 + 72 + 16  # emb (tied head not again), pos, proj, norm; frozen excluded


def test_optimizer_uses_a_multi_tensor_kernel_and_refuses_an_all_frozen_model():
    m = Toy()
    cfg = TrainConfig(lr=1e-3)
    opt = build_optimizer(m, cfg, resolve_lr(cfg, 1))
    assert opt.defaults["foreach"] or opt.defaults["fused"]
    m.requires_grad_(False)
    with pytest.raises(ValueError, match="freeze"):
        build_optimizer(m, cfg, resolve_lr(cfg, 1))


def test_fitted_lr_law_from_hparams_replaces_the_paper_law(tmp_path):
    law = tmp_path / "lr_law.json"
    law.write_text(json.dumps({"a": -0.5, "b": -0.2, "wd_ratio": 0.05}))
    choice = resolve_lr(TrainConfig(lr_law=str(law)), 1_000_000)
    assert choice.lr == pytest.approx(math.exp(-0.5 * math.log(1e6) - 0.2), rel=1e-12)
    assert choice.weight_decay == pytest.approx(0.05 * choice.lr) and choice.lr_source == "lr_law"
    assert resolve_lr(TrainConfig(lr_law=str(law), lr=1e-3), 1_000_000).lr == 1e-3


def test_missing_or_malformed_lr_law_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.lr_law=.*no such file"):
        resolve_lr(TrainConfig(lr_law=str(tmp_path / "nope.json")), 10)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": -0.5}))
    with pytest.raises(ConfigError, match="'a' and 'b'"):
        resolve_lr(TrainConfig(lr_law=str(bad)), 10)


class WithQueries(Toy):
    def __init__(self) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(4, 8))  # a 2-D learned query bank: still not decayed


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("steps_before", [0, 7])
def test_decoupled_decay_shrinks_by_exactly_one_minus_lambda_times_schedule_and_spares_the_no_decay_group(steps_before):
    torch.manual_seed(0)
    m = WithQueries()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    lam, cfg = 0.02, TrainConfig(lr=1e-3, weight_decay=0.02, steps=20, warmup_steps=4, min_lr_ratio=0.1)
    choice = resolve_lr(cfg, count_trainable(m))
    assert choice.weight_decay == lam and choice.torch_weight_decay == pytest.approx(lam / 1e-3)
    opt = build_optimizer(m, cfg, choice)
    sched = build_scheduler(opt, cfg)
    for _ in range(steps_before):
        sched.step()
    s_t = WarmupCosine(4, 20, 0.1)(steps_before)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * s_t, rel=1e-12)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)  # zero gradient: Adam's update is 0, only the decay acts
    opt.step()
    for name in ("emb.weight", "proj.weight"):
        got = dict(m.named_parameters())[name].detach()
        torch.testing.assert_close(got, before[name] * (1 - lam * s_t), rtol=1e-6, atol=0)
    for name in ("pos_embed", "queries", "proj.bias", "norm.weight", "norm.bias", "frozen.weight"):
        assert torch.equal(dict(m.named_parameters())[name].detach(), before[name]), name


def test_the_law_gives_torch_its_ratio_and_a_zero_lr_with_decay_is_refused():
    auto = resolve_lr(TrainConfig(), 4_400_000)
    assert auto.torch_weight_decay == pytest.approx(0.1) and "torch AdamW weight_decay 0.1" in auto.describe()
    assert resolve_lr(TrainConfig(lr=0.0, weight_decay=0.0), 10).torch_weight_decay == 0.0
    with pytest.raises(ConfigError, match="train.weight_decay=0.01 needs a positive peak LR"):
        _ = resolve_lr(TrainConfig(lr=0.0, weight_decay=0.01), 10).torch_weight_decay


def test_sft_runs_at_its_own_fraction_of_the_law_unless_the_lr_is_set():
    pre = resolve_lr(TrainConfig(stage="pretrain"), 4_400_000)
    sft = resolve_lr(TrainConfig(stage="sft"), 4_400_000)
    assert sft.lr == pytest.approx(0.17 * pre.lr) and sft.lr_scale == 0.17 and pre.lr_scale == 1.0
    assert "x 0.17 (train.lr_scale x train.sft_lr_scale" in sft.describe()
    assert resolve_lr(TrainConfig(stage="sft", sft_lr_scale=0.5), 4_400_000).lr == pytest.approx(0.5 * pre.lr)
    fixed = resolve_lr(TrainConfig(stage="sft", lr=3e-4, lr_scale=2.0), 4_400_000)
    assert (fixed.lr, fixed.lr_scale) == (3e-4, 1.0)


def test_lr_scale_multiplies_the_law_in_every_stage_and_the_decay_follows():
    pre = resolve_lr(TrainConfig(stage="encoder"), 4_400_000)
    fast = resolve_lr(TrainConfig(stage="encoder", lr_scale=2.0), 4_400_000)
    assert fast.lr == pytest.approx(2 * pre.lr) and fast.weight_decay == pytest.approx(2 * pre.weight_decay)
    assert fast.torch_weight_decay == pytest.approx(0.1) and "x 2 (train.lr_scale" in fast.describe()
    both = resolve_lr(TrainConfig(stage="sft", lr_scale=2.0, sft_lr_scale=0.25), 4_400_000)
    assert both.lr == pytest.approx(0.5 * pre.lr) and both.lr_scale == pytest.approx(0.5)


class Parts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision, self.connector, self.lm = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)


def test_lr_multipliers_give_each_part_its_own_lr_and_keep_the_per_step_decay():
    from mm1.config import LRMultConfig

    m = Parts()
    cfg = TrainConfig(lr=1e-3, weight_decay=1e-4, lr_mult=LRMultConfig(vision=0.1, connector=2.0))
    opt = build_optimizer(m, cfg, resolve_lr(cfg, 1))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert opt.param_groups[0]["name"] == "decay/lm"  # the LM's LR is the one the trainer logs
    assert by_name["decay/vision"]["lr"] == pytest.approx(1e-4) and by_name["decay/connector"]["lr"] == pytest.approx(
        2e-3
    )
    assert {id(p) for p in by_name["no_decay/vision"]["params"]} == {id(m.vision.bias)}
    for g in opt.param_groups:  # the per-step decay lr x weight_decay is λ in every decayed group
        assert g["lr"] * g["weight_decay"] == pytest.approx(1e-4 if g["name"].startswith("decay") else 0.0)
    sched = build_scheduler(opt, cfg)
    opt.step()
    sched.step()
    assert by_name["decay/vision"]["lr"] / by_name["decay/lm"]["lr"] == pytest.approx(0.1)
    plain = [g["name"] for g in param_groups(m, 0.1, 1e-3, LRMultConfig())]
    assert plain == ["decay", "no_decay"]  # all multipliers 1: the two groups of old
