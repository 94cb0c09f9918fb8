"""Where a run's per-step metrics go: `train.loggers=[jsonl,tensorboard,wandb]`.

Each sink is a registry entry taking (run dir, config) with `log(record)` and `close()`:
- `jsonl` (always on): `metrics.jsonl`, one JSON object per optimizer step. It is the run's record:
  resume cuts it back to the checkpoint, reports and plots read it.
- `tensorboard`: scalars under `RUN/tensorboard/` (`pip install 'mm1[tensorboard]'`).
- `wandb`: a Weights & Biases run in `RUN/wandb/` (`pip install 'mm1[wandb]'`). Offline by default
  (`train.wandb_mode=offline`): nothing leaves the machine and no account is needed; `wandb sync
  RUN/wandb/offline-run-*` uploads it later. `online` needs a login; `disabled` turns it off.
A sink whose package is missing is refused at start with the install line, not mid-run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

from mm1.config import Config, to_dict
from mm1.registry import ConfigError, Registry, one_of


class Sink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


LOGGERS: Registry[type] = Registry("experiment logger", "train.loggers", lambda cfg: list(cfg.train.loggers))


@LOGGERS.validates
def _check_wandb_mode(cfg: Config) -> None:
    one_of("train.wandb_mode", cfg.train.wandb_mode, ("offline", "online", "disabled"))


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information as text
    return v


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {
        k: v
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)
    }


def _missing(name: str, extra: str) -> ConfigError:
    return ConfigError(
        f"train.loggers includes {name} but the {name} package is not installed: "
        f"pip install 'mm1[{extra}]' (or drop {name} from train.loggers)"
    )


@LOGGERS.register("jsonl")
class JsonlSink:
    def __init__(self, run_dir: Path, cfg: Config) -> None:
        self.file = open(Path(run_dir) / "metrics.jsonl", "a")

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@LOGGERS.register("tensorboard")
class TensorBoardSink:
    def __init__(self, run_dir: Path, cfg: Config) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        for k, v in _scalars(record).items():
            self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.writer.close()


@LOGGERS.register("wandb")
class WandbSink:
    def __init__(self, run_dir: Path, cfg: Config) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        t = cfg.train
        self.run = wandb.init(
            project=t.wandb_project,
            name=Path(run_dir).resolve().name,
            dir=str(run_dir),
            mode=t.wandb_mode,
            config=to_dict(cfg),
            resume="allow",
            id=f"{Path(run_dir).resolve().name}-{t.seed}",
            settings=wandb.Settings(silent=True),
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def build_loggers(run_dir: Path, cfg: Config) -> list[Sink]:
    """The configured sinks, jsonl first (it must exist even if a later sink fails to start)."""
    names = list(dict.fromkeys(["jsonl", *cfg.train.loggers]))
    sinks: list[Sink] = []
    try:
        for name in names:
            sinks.append(LOGGERS.get(name)(run_dir, cfg))
    except BaseException:
        for s in sinks:
            s.close()
        raise
    return sinks
