"""`resolve_inputs(cfg)`: the one place a run's inputs are found - world, tokenizer, sources.

A path in the data section may say `{world}` for the synthetic world's root (the embedded default:
`data.tokenizer=""` means `{world}/tokenizer.json`, and the default sources are `{world}/caption`,
...). Train, eval and the experiments all go through this module, so the world is built in one
place (only when something the command reads needs it, and only by the main process of a
distributed job), the tokenizer is loaded in one place, and every source reaches the loader with
its placeholder filled in and the data's trust policy attached.

    resolve_inputs(cfg)
        -> Inputs.world       root of the synthetic world, or None when nothing read needs it
        -> Inputs.tokenizer   the tokenizer the data is encoded with
        -> Inputs.sources     SourceSpec per mixture entry of `cfg.train.stage` (weight > 0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm1.data.kinds import get_kind
from mm1.data.mixture import SourceSpec
from mm1.data.safety import ReadPolicy
from mm1.data.tokenizer import Tokenizer
from mm1.data.world import ensure_world
from mm1.registry import ConfigError

WORLD = "{world}"
DEFAULT_TOKENIZER = f"{WORLD}/tokenizer.json"  # what data.tokenizer="" means


@dataclass
class Inputs:
    """What a command reads, every `{world}` filled in."""

    world: Path | None
    tokenizer: Tokenizer | None  # None only when the caller asked for no tokenizer (blind baselines)
    sources: list[SourceSpec]


def stage_sources(cfg: Any) -> list[tuple[str, str, str, float]]:
    """(name, kind, path, weight) of every source `cfg.train.stage` reads; the path still raw."""
    d = cfg.data
    if cfg.train.stage == "sft":
        raw = [("sft", "sft", d.sft, 1.0)]
    else:
        raw = [(name, s.kind, s.path, float(s.weight)) for name, s in d.sources.items()]
        if cfg.train.stage == "encoder":  # encoder pre-training learns from image-text pairs only
            raw = [r for r in raw if get_kind(r[1]).image_text_pairs]
    if not any(w > 0 for *_, w in raw):
        raise ConfigError(f"data.sources: no source with a positive weight for train.stage={cfg.train.stage}")
    return [r for r in raw if r[3] > 0]


def resolve_inputs(
    cfg: Any,
    tokenizer: Tokenizer | None = None,
    *,
    load_tokenizer: bool = True,
    sources: bool = True,
    world_part: str = "",
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Inputs:
    """Build the world if a path this command reads needs it, then load the tokenizer and resolve
    the stage's sources.

    `tokenizer`: one the caller already has (a checkpoint's), used as is; else it is loaded from
    `data.tokenizer` when `load_tokenizer`. `sources=False` for commands that do not train (eval).
    `world_part`: a folder of the world the command reads by itself ("eval" for the `world_*` eval
    tasks); the world is built if that folder is missing, and a folder that has it is used as is (a
    hand-made eval set needs no manifest). In a distributed job pass `is_main` and a `barrier`: the
    main process builds, the others wait.
    """
    d = cfg.data
    tok_path = d.tokenizer or DEFAULT_TOKENIZER
    raw = stage_sources(cfg) if sources else []
    reads = [p for _, _, p, _ in raw] + ([tok_path] if tokenizer is None and load_tokenizer else [])
    world: Path | None = None
    part_missing = bool(world_part) and not (Path(d.world).expanduser() / world_part).is_dir()
    if part_missing or any(WORLD in p for p in reads):
        if is_main:
            ensure_world(d)
        barrier()
        world = ensure_world(d, verbose=False)
    elif world_part:
        world = Path(d.world).expanduser()
    root = str(world) if world is not None else WORLD  # left as is: the reader's error names the placeholder
    if tokenizer is None and load_tokenizer:
        tokenizer = Tokenizer.load(tok_path.replace(WORLD, root))
    policy = ReadPolicy.from_config(d)
    specs = [
        SourceSpec(name, kind, path.replace(WORLD, root), weight, policy, d.shuffle_block)
        for name, kind, path, weight in raw
    ]
    return Inputs(world, tokenizer, specs)


__all__ = ["DEFAULT_TOKENIZER", "Inputs", "WORLD", "resolve_inputs", "stage_sources"]
