"""`mm1 eval` (few-shot benchmarks on a checkpoint) and `mm1 generate` (answer one prompt).

Both subcommands live here; the CLI registers this module twice and `add_arguments` / `run` tell
them apart by the subcommand name.

    mm1 eval configs/tiny.yaml --checkpoint runs/tiny --tasks world_caption,world_vqa --shots 0,4,8
    mm1 eval configs/tiny.yaml --blind                      # the blind baselines, no model needed
    mm1 eval --hf exported/ --tasks world_vqa               # a transformers LLaVA folder, same runner
    mm1 generate --checkpoint runs/tiny --image a.png --prompt "<image>A short description:"
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from mm1.config import Config, DataConfig, load_config
from mm1.data.inputs import resolve_inputs
from mm1.registry import ConfigError
from mm1.train.distributed import DistEnv


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 0,4,8") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if parser.prog.split()[-1] == "generate":
        parser.add_argument("--checkpoint", required=True, help="run dir or checkpoint dir")
        parser.add_argument("--image", action="append", default=[], help="image file (repeat; fills <image> in order)")
        parser.add_argument(
            "--prompt", required=True, help="text with one <image> per --image; images without a marker are put first"
        )
        parser.add_argument("--max-new-tokens", type=int, default=64)
        parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable; default newline)")
        parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
        parser.add_argument("--temperature", type=float, default=1.0)
        parser.add_argument("--top-p", type=float, default=1.0)
        parser.add_argument("--seed", type=int, default=0)
        parser.set_defaults(takes_overrides=True)  # on the checkpoint's config, e.g. eval.add_bos=true
        return
    parser.set_defaults(takes_overrides=True)  # e.g. eval.trials=3 eval.chat=true, anywhere on the line
    parser.add_argument(
        "config", nargs="?", help="preset name or YAML for eval/data settings (default: the checkpoint's)"
    )
    parser.add_argument(
        "--checkpoint",
        help="run dir or checkpoint dir (default: build the model from CONFIG, e.g. HF-initialised weights)",
    )
    parser.add_argument(
        "--hf",
        metavar="PATH",
        help="a transformers LLaVA-format folder (e.g. from mm1 export) "
        "scored instead of a checkpoint (pip install 'mm1[hf]')",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="with --hf: allow the folder's own modeling file to run (mm1 exports of non-mlp connectors)",
    )
    parser.add_argument("--tasks", help="comma-separated task names or task spec files (default: eval.tasks)")
    parser.add_argument("--shots", type=_ints, help="e.g. 0,4,8 (default: eval.shots)")
    parser.add_argument("--limit", type=int, help="test items per task (default: eval.limit; 0 = all)")
    parser.add_argument("--json", dest="json_dir", help="directory for one result JSON per (task, shots)")
    parser.add_argument("--blind", action="store_true", help="also (or, without a model, only) score blind baselines")


def _load(
    args: argparse.Namespace, env_of: Callable[[Config], DistEnv]
) -> tuple[object | None, Config, object | None, DistEnv]:
    """(model, config, tokenizer, this process's place from `env_of(config)`); the model is None for a
    blind-only run. A checkpoint's weights go straight to the device in `eval.dtype`."""
    cfg = load_config(args.config, args.overrides) if args.config else None
    if args.hf:
        if args.checkpoint:
            raise SystemExit("mm1 eval: give --checkpoint or --hf, not both")
        from mm1.eval.hf_model import load_hf_llava

        try:
            model, tok, resize = load_hf_llava(args.hf, args.trust_remote_code)
        except (ValueError, ImportError) as e:
            raise SystemExit(f"mm1 eval: --hf {args.hf}: {e}") from None
        cfg = cfg or load_config(None, args.overrides)
        cfg.model, cfg.data.resize = model.cfg, resize  # the folder decides its image input
        return model, cfg, tok, env_of(cfg)
    if args.checkpoint:
        model, cfg, tok, env = _from_checkpoint(args.checkpoint, cfg, args.overrides, env_of)
        return model, cfg, tok, env
    if cfg is None:
        raise SystemExit("mm1 eval: give a CONFIG, a --checkpoint, or both")
    if args.blind:
        return None, cfg, None, env_of(cfg)
    from mm1.models.build import build_model

    tok = resolve_inputs(cfg, sources=False).tokenizer
    cfg.model.image_token_id = tok.image_id
    return build_model(cfg.model).eval(), cfg, tok, env_of(cfg)


def _from_checkpoint(path: str, cfg: Config | None, overrides: list[str], env_of: Callable[[Config], DistEnv]):
    """(model, config, tokenizer, env): the eval settings come from CONFIG (or the checkpoint's own
    config + overrides) before any weight is read, so the weights load once, on `eval.device` in
    `eval.dtype`; the checkpoint's model config decides the architecture."""
    from mm1.eval.parallel import resolve_dtype
    from mm1.train.checkpoint import load_checkpoint, read_config, resolve_checkpoint, verify_checkpoint

    ckpt = resolve_checkpoint(path)
    verify_checkpoint(ckpt)
    cfg = cfg if cfg is not None else load_config(overrides=overrides, base=read_config(ckpt))
    env = env_of(cfg)
    model, ckpt_cfg, tok = load_checkpoint(
        ckpt, verify=False, device=env.device, dtype=resolve_dtype(cfg.eval.dtype, env.device)
    )
    cfg.model = ckpt_cfg.model
    return model, cfg, tok, env


def _check_world_is_yours(args: argparse.Namespace, cfg: Config) -> None:
    """A world is built only where the user said (CONFIG or data.world=) or at the default path: a
    checkpoint's config.yaml is data from whoever shared it, and checksums prove integrity, not origin."""
    said = args.config or any(o.split("=", 1)[0] == "data.world" for o in args.overrides)
    if not said and cfg.data.world != DataConfig().world:
        raise ConfigError(
            f"the checkpoint's config names data.world={cfg.data.world}, which holds no world; mm1 eval "
            "builds a world only where you say: add data.world=PATH (or a CONFIG) to the command"
        )


def _needs_world(tasks: list[str]) -> bool:
    return any(t.startswith("world_") for t in tasks)


@torch.no_grad()  # a scope, not a global switch: commands also run in-process (tests)
def run_eval(args: argparse.Namespace) -> int:
    """Under torchrun every rank scores its share of the items (`mm1.eval.parallel`); rank 0 reports."""
    from mm1.eval.parallel import Shards, eval_env, place
    from mm1.eval.runner import evaluate, format_average, format_table
    from mm1.train.distributed import barrier, shutdown

    model, cfg, tok, env = _load(args, lambda c: eval_env(c.eval))
    try:
        if model is not None:
            model = place(model, cfg.eval, env)
        tasks = args.tasks.split(",") if args.tasks else list(cfg.eval.tasks)
        part = "eval" if _needs_world(tasks) else ""
        if part and not (Path(cfg.data.world) / part).is_dir():  # a fresh machine: the world is built first
            _check_world_is_yours(args, cfg)
        resolve_inputs(
            cfg,
            tok,
            load_tokenizer=False,
            sources=False,
            world_part=part,
            is_main=env.is_main,
            barrier=partial(barrier, env),
        )
        limit = cfg.eval.limit if args.limit is None else args.limit
        results = []
        if model is not None:
            results = evaluate(model, tok, cfg, tasks, args.shots, limit, args.json_dir, shards=Shards(env))
        if env.is_main:
            results += _blind(args, cfg, tasks, limit) if args.blind else []
            print()
            print(format_table(results))
            if format_average(results):
                print(format_average(results))
    finally:
        shutdown(env)
    return 0


def _blind(args: argparse.Namespace, cfg: Config, tasks: list[str], limit: int) -> list[dict]:
    from mm1.eval.baselines import blind_baseline
    from mm1.eval.tasks import get_task

    results = []
    for name in tasks:
        task = get_task(name, cfg.data.world, cfg.data.allow_outside_paths)
        if task.spec.metric in ("cider", "vqa", "exact"):
            b = blind_baseline(task, limit, cfg.eval.vqa_mode)
            results.append(
                {
                    "task": f"{name} (blind: {b['baseline']})",
                    "metric": b["metric"],
                    "shots": 0,
                    "score": b["score"],
                    "std": 0.0,
                    "trial_scores": [b["score"]],
                }
            )
            if args.json_dir:
                Path(args.json_dir).mkdir(parents=True, exist_ok=True)
                (Path(args.json_dir) / f"{name}_blind.json").write_text(json.dumps(b, indent=1))
    return results


@torch.no_grad()  # a scope, not a global switch: commands also run in-process (tests)
def run_generate(args: argparse.Namespace) -> int:
    from mm1.eval.generate import generate
    from mm1.eval.parallel import resolve_device

    model, cfg, tok, _ = _from_checkpoint(
        args.checkpoint, None, args.overrides, lambda c: DistEnv(device=resolve_device(c.eval.device))
    )
    prompt, missing = args.prompt, len(args.image) - args.prompt.count("<image>")
    if missing < 0:
        print(
            f"mm1 generate: the prompt has {prompt.count('<image>')} <image> markers but only "
            f"{len(args.image)} --image files",
            file=sys.stderr,
        )
        return 2
    prompt = "<image>" * missing + prompt
    for img in args.image:
        if not Path(img).is_file():
            print(f"mm1 generate: --image {img}: no such file", file=sys.stderr)
            return 2
    stop = args.stop if args.stop is not None else ["\n"]
    out = generate(
        model,
        tok,
        [prompt],
        [list(args.image)],
        max_new_tokens=args.max_new_tokens,
        stop=stop,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        resize=cfg.data.resize,
        add_bos=cfg.eval.add_bos,
    )
    print(out[0])
    return 0


def run(args: argparse.Namespace) -> int:
    return run_generate(args) if args.command == "generate" else run_eval(args)
