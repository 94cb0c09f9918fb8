"""A training run that ends on the clock: `train.time_budget_s` with the warmup-stable-decay schedule.

Why the trainer keeps the budget rather than a step count fixed in advance: the step time of a
shared or throttled CPU drifts by ±20 % within minutes, so a count calibrated on 30 steps overran a
600 s budget by 5-17 % (docs/grounding.md section 12). Here the stable phase lasts until the clock
reaches (1 − decay_fraction) of the budget; from then on, after every step, the run's end is
re-estimated from the time the last WINDOW steps took (periodic evals and checkpoint writes
included), and the linear decay is stretched or shortened to end there, leaving room for the final
checkpoint (RESERVE_SHARE of the budget, or more once a checkpoint write was timed). `train.steps` stays a cap:
a run that reaches it first decays by its step count as usual.

The clock counts from the start of `Trainer.run` (set-up included) and is carried in checkpoints,
so a resumed run spends only what is left. When the decay starts depends on the machine, so a
budgeted run is not repeatable step for step; a resume restores the decay's start and end as saved.
When the projected end moves by a step, the decay's LR moves by one step's worth of its slope (seen:
3.67e-05 twice in a row), so the decay is monotone only up to that.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

from mm1.train.optim import WarmupStableDecay

WINDOW = 20  # steps whose wall time sets the rate the end is projected at
RECENT = 3  # the latest steps, whose median wins when the machine slows down
# kept free at the end for the final checkpoint: this share of the budget, or 1.5 x the longest
# checkpoint write timed so far if that is more
RESERVE_SHARE = 0.01
RESERVE_SAVES = 1.5


def now() -> float:
    """The budget's clock (monotonic seconds); the trainer marks a run's start with it."""
    return time.perf_counter()


class TimeBudget:
    """Decides, after each step, whether and where a WSD run ends within `seconds` of wall time."""

    def __init__(
        self,
        seconds: float,
        decay_fraction: float,
        schedule: WarmupStableDecay,
        max_steps: int,
        started: float,
        agree: Callable[[float], float] = float,
    ) -> None:
        """`started`: `now()` when the run began; `agree` maps this process's seconds to the value
        every process uses (the mean over ranks), so all ranks stop at the same step."""
        self.seconds = float(seconds)
        self.decay_at = (1.0 - decay_fraction) * self.seconds
        self.schedule = schedule
        self.max_steps = max_steps
        self.agree = agree
        self._t0 = started
        self._marks: deque[tuple[int, float]] = deque(maxlen=WINDOW + 1)
        self.end: int | None = None  # the projected last step count once the decay has begun
        self.projected_end = max_steps  # where the run would end at the current speed (for progress)
        self.longest_save = 0.0

    @property
    def reserve(self) -> float:
        """Seconds left free after the last step, for writing its checkpoint."""
        return max(RESERVE_SHARE * self.seconds, RESERVE_SAVES * self.longest_save)

    def saved(self, seconds: float) -> None:
        """A checkpoint write took `seconds` (the final one will take about as long)."""
        self.longest_save = max(self.longest_save, seconds)

    def spent(self) -> float:
        """Seconds of this run so far, across resumes, agreed between ranks."""
        return self.agree(now() - self._t0)

    def state_dict(self) -> dict:
        return {
            "spent_s": self.spent(),
            "end": self.end,
            "decay_start": self.schedule.decay_start,
            "longest_save_s": self.longest_save,
        }

    def restore(self, state: dict) -> None:
        """Continue a saved run: add the seconds it had spent, and keep the decay it had begun."""
        self._t0 -= float(state["spent_s"])
        self.longest_save = float(state.get("longest_save_s", 0.0))
        if state.get("end") is not None:
            self.end = int(state["end"])
            self.schedule.end_at(self.end, int(state["decay_start"]))

    def _step_seconds(self, spent: float, done: int) -> float:
        """Seconds a step takes now: the mean over the window (evals and saves amortised), or the
        median of the last RECENT steps if higher, so a slow-down shortens the run within a few
        steps and the decay still reaches its floor (a speed-up only ends the run a little early)."""
        marks = list(self._marks)
        if len(marks) < 2:
            return spent / max(done, 1)
        mean = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
        tail = marks[-RECENT - 1 :]
        recent = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(tail, tail[1:], strict=False)]
        return max(mean, statistics.median(recent))

    def after_step(self, done: int) -> bool:
        """Call after `done` steps, before the scheduler steps; True if `done` was the last step."""
        spent = self.spent()
        self._marks.append((done, spent))
        left = max(0, int((self.seconds - self.reserve - spent) / max(self._step_seconds(spent, done), 1e-9)))
        self.projected_end = min(self.max_steps, done + left)
        if self.end is None and spent < self.decay_at and done < self.schedule.decay_start:
            return done >= self.max_steps
        self.end = self.projected_end
        self.schedule.end_at(self.end, decay_start=done)
        return done >= self.end
