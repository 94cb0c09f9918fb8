"""The `mm1` command. Each subcommand lives beside the code it drives, in a module that exposes
`add_arguments(parser)` and `run(args) -> int`; this file only routes.

Dotted overrides (`train.steps=10`) may stand anywhere after the subcommand: they are taken out of
the command line before argparse sees it (argparse would hand them to an optional positional such
as `mm1 eval [CONFIG]`, or refuse them after an option) and given to the subcommand as
`args.overrides`. A token is an override when it looks like `key.path=value` and is not the value
of an option (`--prompt "a.b=c"` stays a prompt).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import re
import sys
from typing import Any

import yaml

from mm1.data.skips import DataError
from mm1.registry import ConfigError
from mm1.train.checkpoint import CheckpointError

# errors that come from the input, the files or the machine (a bad key, a damaged shard or checkpoint,
# a busy run dir, a full disk): reported as one line with exit code 2. Anything else is a bug: traceback.
EXPECTED = (ConfigError, DataError, CheckpointError, yaml.YAMLError, OSError)

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("mm1.models.info", "parameter counts, image tokens and FLOPs of a config (meta device)"),
    "world": ("mm1.data.world.command", "write the synthetic world (default corpus) in real data formats"),
    "train": ("mm1.train.command", "train a stage (encoder / pretrain / sft) into a run dir; torchrun for many GPUs"),
    "eval": ("mm1.eval.command", "few-shot captioning / VQA / multiple-choice / text benchmarks on a checkpoint"),
    "generate": ("mm1.eval.command", "answer one interleaved image-text prompt with a checkpoint"),
    "export": ("mm1.export.command", "write a checkpoint as a transformers LLaVA folder (--format hf)"),
    "demo": ("mm1.experiments.demo", "the whole workflow on the tiny synthetic world -> runs/demo/report.md"),
    "ablate": ("mm1.experiments.command", "sweep any config axes x seeds -> runs -> report (table, plots, configs)"),
    "lessons": ("mm1.experiments.command", "re-measure the MM1 paper's ablation lessons on the synthetic world"),
    "hparams": ("mm1.experiments.command", "learning-rate grid on a few LM sizes and a fit of the LR law"),
}


OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*=")
OVERRIDE_HELP = " [key.path=value ...]"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that remembers its options taking a value (from the Action the public
    `add_argument` returns), so overrides can be told apart from option values without argparse's
    private tables. Subcommands add their options to the parser itself (argument groups would
    bypass this record)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.value_options: set[str] = set()

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.nargs != 0:
            self.value_options.update(action.option_strings)
        return action


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, _Parser]]:
    """The `mm1` parser and its subcommand parsers by name."""
    parser = argparse.ArgumentParser(prog="mm1", description="Multimodal LLMs the MM1 way.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    commands: dict[str, _Parser] = {}
    for name, (module, help_text) in COMMANDS.items():
        p = commands[name] = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)  # a subcommand using overrides sets takes_overrides=True
        if p.get_default("takes_overrides"):
            p.usage = (p.usage or p.format_usage().removeprefix("usage: ").strip()) + OVERRIDE_HELP
    return parser, commands


def split_overrides(value_options: set[str], argv: list[str]) -> tuple[list[str], list[str]]:
    """(the command line without overrides, the overrides in order); `value_options` are the options
    whose next token is their value, never an override."""
    rest: list[str] = []
    overrides: list[str] = []
    for i, tok in enumerate(argv):
        after_option = i > 0 and argv[i - 1] in value_options
        if i > 0 and OVERRIDE.match(tok) and not after_option and "--" not in argv[:i]:
            overrides.append(tok)
        else:
            rest.append(tok)
    return rest, overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; `args.overrides` holds its dotted overrides wherever they stood."""
    parser, commands = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    at = next((i for i, tok in enumerate(argv) if tok in commands), None)
    overrides: list[str] = []
    if at is not None:
        tail, overrides = split_overrides(commands[argv[at]].value_options, argv[at:])
        argv = argv[:at] + tail
    args = parser.parse_args(argv)
    if overrides and not getattr(args, "takes_overrides", False):
        parser.error(f"mm1 {args.command} takes no config overrides, got {' '.join(overrides)}")
    args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"mm1 {args.command}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED as e:  # the user's input or machine, not a bug: one line, no traceback
        print(f"mm1 {args.command}: {error_line(e)}", file=sys.stderr)
        return 2


def error_line(e: BaseException) -> str:
    """One line for an expected error: its kind, then its message with newlines folded."""
    if isinstance(e, ConfigError):
        kind = "config error"
    elif isinstance(e, (DataError, FileNotFoundError)):
        kind = "data error"
    elif isinstance(e, CheckpointError):
        kind = "checkpoint error"
    elif isinstance(e, yaml.YAMLError):
        kind = "YAML error"
    elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"disk full while writing {e.filename or 'output'}: {e.strerror}; free space (or choose "
            "another --out) and rerun; a half-written checkpoint is never used"
        )
    else:
        kind = "error"
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return f"{kind}: {text}"


if __name__ == "__main__":
    sys.exit(main())
