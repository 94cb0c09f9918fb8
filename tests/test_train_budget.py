"""`train.time_budget_s`: a WSD run that ends on the clock, whatever the machine's speed does.

The clock is faked (`mm1.train.budget.time`), so every test is exact: a step "takes" what the test
says, the decay starts at (1 - decay_fraction) of the budget and the last step ends inside it."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from mm1.config import load_config
from mm1.registry import ConfigError
from mm1.train import budget as budget_module
from mm1.train.budget import TimeBudget
from mm1.train.checkpoint import list_checkpoints
from mm1.train.metrics import read_metrics
from mm1.train.optim import WarmupStableDecay
from mm1.train.trainer import Trainer, train


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def perf_counter(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(budget_module, "time", SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def _run(budget: TimeBudget, clock: FakeClock, step_seconds) -> list[float]:
    """Steps until the budget ends the run; returns the multiplier each step ran at."""
    mults, done = [], 0
    while True:
        mults.append(budget.schedule(done))
        clock.t += step_seconds(done)
        done += 1
        if budget.after_step(done):
            return mults


def test_the_decay_starts_at_the_fraction_of_the_budget_and_the_run_ends_inside_it(clock):
    wsd = WarmupStableDecay(warmup=5, total=10_000, min_ratio=0.1, decay_fraction=0.2)
    budget = TimeBudget(100.0, 0.2, wsd, max_steps=10_000, started=clock.t)
    mults = _run(budget, clock, lambda step: 1.0)
    assert budget.reserve == 1.0  # 1 % kept for the final checkpoint
    assert len(mults) == 99 and budget.spent() == pytest.approx(99.0)
    assert mults[4:80] == [1.0] * 76  # peak until 80 s
    assert mults[-1] == pytest.approx(0.1) and all(a > b for a, b in zip(mults[80:], mults[81:], strict=False))


def test_a_machine_that_slows_down_mid_decay_still_ends_within_one_step_of_the_budget(clock):
    wsd = WarmupStableDecay(warmup=0, total=10_000, min_ratio=0.0, decay_fraction=0.2)
    budget = TimeBudget(100.0, 0.2, wsd, max_steps=10_000, started=clock.t)
    mults = _run(budget, clock, lambda step: 1.0 if step < 85 else 2.0)  # twice as slow from 85 s on
    assert 99.0 - 2.0 < budget.spent() <= 99.0
    assert len(mults) < 99 and mults[-1] == 0.0  # fewer steps, the decay still reaches the floor
    # a fixed count taken from the first 80 steps would have run 99 steps: 127 s
    assert budget.end == len(mults)


def test_a_timed_checkpoint_write_widens_the_reserve_and_survives_a_resume(clock):
    wsd = WarmupStableDecay(warmup=0, total=10_000, min_ratio=0.0, decay_fraction=0.2)
    budget = TimeBudget(100.0, 0.2, wsd, max_steps=10_000, started=clock.t)
    budget.saved(4.0)
    assert budget.reserve == 6.0
    assert len(_run(budget, clock, lambda step: 1.0)) == 94
    again = TimeBudget(100.0, 0.2, WarmupStableDecay(0, 10_000, 0.0, 0.2), max_steps=10_000, started=clock.t)
    again.restore(budget.state_dict())
    assert again.reserve == 6.0 and again.end == 94 and again.spent() == pytest.approx(94.0)


def test_train_steps_stays_a_cap_with_the_plain_wsd_shape(clock):
    wsd = WarmupStableDecay(warmup=2, total=30, min_ratio=0.1, decay_fraction=0.5)
    plain = [wsd(s) for s in range(30)]
    budget = TimeBudget(1e6, 0.5, wsd, max_steps=30, started=clock.t)
    assert _run(budget, clock, lambda step: 1.0) == plain


def test_a_budget_needs_wsd_and_a_non_negative_number():
    with pytest.raises(ConfigError, match="train.schedule=wsd"):
        load_config("configs/tiny.yaml", ["train.time_budget_s=60"])
    with pytest.raises(ConfigError, match="train.time_budget_s"):
        load_config("configs/tiny.yaml", ["train.schedule=wsd", "train.time_budget_s=-1"])


ARGS = [
    "model.lm.n_layers=2",
    "model.vision.depth=2",
    "data.seq_len=128",
    "data.batch_size=1",
    "train.warmup_steps=3",
    "train.schedule=wsd",
    "train.decay_fraction=0.5",
    "train.time_budget_s=16",
    "train.steps=1000",
    "train.save_every=4",
    "train.keep_last=10",
]


def test_a_budgeted_run_ends_on_the_clock_and_resumes_mid_decay_exactly(tiny_world, tmp_path, clock, monkeypatch):
    """Each step takes one fake second and a checkpoint none, so the run is 15 steps (0.16 s kept for
    the last checkpoint): 8 at the peak, 7 decaying. A resume from the checkpoint of step 12
    (mid-decay) restores the clock and the decay: the same steps, LRs and losses."""
    real_step = Trainer._step

    def one_second_step(self):
        clock.t += 1.0
        return real_step(self)

    monkeypatch.setattr(Trainer, "_step", one_second_step)
    cfg = load_config("configs/tiny.yaml", [f"data.world={tiny_world}", *ARGS])
    ref = tmp_path / "ref"
    result = train(cfg, ref)
    rows = read_metrics(ref)
    assert result["steps"] == len(rows) == 15
    peak = rows[3]["lr"]
    assert [r["lr"] for r in rows[3:8]] == [peak] * 5 and rows[-1]["lr"] == pytest.approx(0.1 * peak)
    assert list_checkpoints(ref)[-1].name.endswith("15")  # the last step wrote its checkpoint

    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    for ckpt in list_checkpoints(run):
        if int(ckpt.name.split("-")[-1]) > 12:
            shutil.rmtree(ckpt)
    train(cfg, run, resume=True)
    got = read_metrics(run)
    assert [(r["step"], r["lr"], r["loss"]) for r in got] == [(r["step"], r["lr"], r["loss"]) for r in rows]
