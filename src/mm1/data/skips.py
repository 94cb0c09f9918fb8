"""Counting the samples we skip, so that bad data is survivable but never silent.

Real corpora always hold some junk: a truncated JPEG, a tar shard cut short by a failed upload, an
empty alt-text. Crashing a week-long run on one of them is wrong; skipping them without a word is
worse, because a broken pipeline that drops 40 % of the data still trains. So every reader (and the
loader workers that decode images later) reports each sample as `ok()` or `skip(reason, where)`;
`SkipCounter` logs each skip with its shard and key (rate-limited per reason), keeps counts per
reason that survive a resume (`state_dict`), and raises `DataError` once the skip rate passes
`data.max_skip_rate` after at least `min_samples` samples.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("mm1.data")


class DataError(ValueError):
    """The data on disk is wrong. The message names the file (and sample) and how to fix it."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A configured data path does not exist (or a glob/brace pattern matched nothing)."""


class SkipCounter:
    """Per-reason counts of skipped samples with a threshold on the skip rate.

    `seen` counts every sample considered (good or bad). A sample a reader already reported as
    `ok()` that later fails (e.g. its image does not decode in a loader worker) is reported with
    `skip(reason, where, already_counted=True)`, so it is not counted twice in the denominator.
    Loader workers hold their own copy; fold their counts back with `merge(worker.state_dict())`.
    """

    def __init__(
        self, max_skip_rate: float = 0.05, min_samples: int = 200, log_first: int = 5, name: str = "data"
    ) -> None:
        if not 0.0 <= max_skip_rate <= 1.0:
            raise ValueError(f"data.max_skip_rate={max_skip_rate}: must be in [0, 1]")
        self.max_skip_rate = max_skip_rate
        self.min_samples = max(1, min_samples)
        self.log_first = log_first  # per reason, log this many skips one by one, then every 10x
        self.name = name  # e.g. the source name, used in messages
        self.seen = 0
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}  # reason -> the first `where` seen, for the error message

    @classmethod
    def from_config(cls, data_cfg: Any, name: str = "data", min_samples: int = 200) -> SkipCounter:
        """Build from `cfg.data` (reads `max_skip_rate`)."""
        return cls(max_skip_rate=float(data_cfg.max_skip_rate), min_samples=min_samples, name=name)

    # ------------------------------------------------------------------ reporting

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    @property
    def rate(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def ok(self, n: int = 1) -> None:
        """`n` samples were read (or decoded) successfully."""
        self.seen += n
        if self.counts and self.seen - n < self.min_samples <= self.seen:  # the rate becomes judgeable
            self.check()

    def skip(self, reason: str, where: str, detail: str = "", already_counted: bool = False, lost: int = 1) -> None:
        """`lost` samples (one, or the rest of a damaged shard) were dropped for `reason` (a short
        fixed phrase, e.g. "corrupt image") at `where` (file plus member/row/line). Logs, counts,
        and raises past the threshold."""
        if not already_counted:
            self.seen += lost
        n = self.counts.get(reason, 0) + lost
        self.counts[reason] = n
        self.examples.setdefault(reason, where)
        if lost > 1 or n <= self.log_first:
            log.warning("%s: skipped sample (%s) at %s%s", self.name, reason, where, f": {detail}" if detail else "")
            if n == self.log_first:
                log.warning("%s: further '%s' skips are logged at every 10x", self.name, reason)
        elif _is_power_of_ten(n):
            log.warning(
                "%s: %d samples skipped so far for '%s' (latest at %s%s)",
                self.name,
                n,
                reason,
                where,
                f": {detail}" if detail else "",
            )
        self.check()

    def check(self, final: bool = False) -> None:
        """Raise `DataError` if the skip rate passed the threshold. Before `min_samples` samples
        the rate is too noisy to judge, unless `final` (the source is exhausted) and every sample
        was bad."""
        if not self.counts:
            return
        if self.seen >= self.min_samples:
            if self.rate > self.max_skip_rate:
                raise DataError(self._message())
        elif final and self.skipped >= self.seen:
            raise DataError(self._message())

    def _message(self) -> str:
        reasons = ", ".join(
            f"{r}: {n} (first at {self.examples.get(r, '?')})"
            for r, n in sorted(self.counts.items(), key=lambda kv: -kv[1])
        )
        suggested = min(1.0, round(self.rate + 0.05, 2))
        return (
            f"{self.name}: skipped {self.skipped} of {self.seen} samples ({self.rate:.1%}), more than "
            f"data.max_skip_rate={self.max_skip_rate}. Reasons: {reasons}. Fix or remove the bad files "
            f"(see the warnings logged by 'mm1.data' for each sample), or accept the loss by raising "
            f"the threshold, e.g. data.max_skip_rate={suggested}."
        )

    def summary(self) -> str:
        """One line for logs and run reports."""
        if not self.counts:
            return f"{self.name}: {self.seen} samples, none skipped"
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        return f"{self.name}: skipped {self.skipped} of {self.seen} samples ({self.rate:.2%}): {reasons}"

    # ------------------------------------------------------------------ resume / workers

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "counts": dict(self.counts), "examples": dict(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state.get("seen", 0))
        self.counts = {str(k): int(v) for k, v in state.get("counts", {}).items()}
        self.examples = {str(k): str(v) for k, v in state.get("examples", {}).items()}

    def merge(self, state: dict[str, Any]) -> None:
        """Add another counter's counts (a DataLoader worker's `state_dict()` delta), then check."""
        self.seen += int(state.get("seen", 0))
        for reason, n in state.get("counts", {}).items():
            self.counts[reason] = self.counts.get(reason, 0) + int(n)
        for reason, where in state.get("examples", {}).items():
            self.examples.setdefault(reason, where)
        self.check()

    def __repr__(self) -> str:
        return f"SkipCounter({self.summary()})"


class Tally:
    """One file's ok/skip reports as a reader makes them, routed to a `SkipCounter`.

    `muted` while a resume replays records the restored counter already counted; `reported` counts
    every sample reported either way (what a file delivered, e.g. to size a truncated tar shard)."""

    def __init__(self, skips: SkipCounter, muted: bool = False) -> None:
        self.skips, self.muted, self.reported = skips, muted, 0

    def ok(self) -> None:
        self.reported += 1
        if not self.muted:
            self.skips.ok()

    def skip(self, reason: str, where: str, detail: str = "", n: int = 1) -> None:
        self.reported += n
        if not self.muted:
            self.skips.skip(reason, where, detail, lost=n)


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1
