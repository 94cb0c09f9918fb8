"""What a run reports while it trains: `metrics.jsonl`, a progress bar, optional TensorBoard / W&B.

One JSON object per optimizer step (rank 0 writes), so a run can be plotted, compared and resumed
from a plain file: `step`, `loss`, `lr` always; then `lm_loss`, `aux_loss`, `loss_<source>` for each
data source kind present in the step, `grad_norm`, `tokens`, `tokens_per_s`, `images_per_s`, `mfu`
(when the accelerator's peak is known), MoE balance statistics, `skipped` for a step dropped by
`train.nonfinite=skip`; every `train.eval_every` steps (and at the last) `loss_probe` and
`loss_shuffled`, one fixed batch's loss with its own and with deranged images (`mm1.train.probe`).
On resume the lines past the checkpoint are cut, so the file reads as one uninterrupted run. The
sinks (`train.loggers`) live in `mm1.train.loggers`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from mm1.config import Config
from mm1.train.loggers import build_loggers

log = logging.getLogger("mm1.train")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines of steps after `last_step` (written by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:  # a half-written last line from a kill
            continue
    path.write_text("".join(k + "\n" for k in keep))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The metrics of a run, one dict per optimizer step."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Sends each step's record to the configured sinks (rank 0), shows a progress bar on a terminal
    or a log line every `log_every` steps elsewhere (cluster logs)."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        cfg: Config,
        progress: bool,
        log_every: int = 1,
    ) -> None:
        self.enabled, self.total, self.log_every = enabled, total_steps, max(1, log_every)
        self.bar = None
        self.sinks = build_loggers(run_dir, cfg) if enabled else []
        if enabled and progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0
            )

    def set_total(self, total_steps: int) -> None:
        """The run's length changed (`train.time_budget_s` decided where it ends)."""
        self.total = total_steps
        if self.bar is not None:
            self.bar.total = total_steps

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        for sink in self.sinks:
            sink.log(record)
        tps = record.get("tokens_per_s", 0.0)
        if self.bar is not None:
            self.bar.set_postfix(
                {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}", "tok/s": f"{tps:.0f}"}, refresh=False
            )
            self.bar.update(1)
        elif record["step"] % self.log_every == 0 or record["step"] == self.total:
            eta = (self.total - record["step"]) * record.get("step_time_s", 0.0)
            log.info(
                "step %d/%d  loss %.4f  lr %.3g  grad %.3g  %.0f tok/s  eta %s",
                record["step"],
                self.total,
                record["loss"],
                record["lr"],
                record.get("grad_norm", float("nan")),
                tps,
                time.strftime("%H:%M:%S", time.gmtime(eta)),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()
