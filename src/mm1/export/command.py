"""`mm1 export RUN_OR_CKPT OUT --format hf`: a trained model as a transformers LLaVA folder.

    mm1 export runs/sft exported --format hf
    python -c "from transformers import AutoModelForImageTextToText as M; M.from_pretrained('exported')"

An `mlp`-connector model becomes a plain `LlavaForConditionalGeneration`; other connectors add a
modeling file (load with `trust_remote_code=True`). The command prints which, and why.
"""

from __future__ import annotations

import argparse
import sys

FORMATS = ("hf",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="run dir (its latest checkpoint) or checkpoint dir")
    parser.add_argument("out", help="folder to write (must not exist unless --overwrite)")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="hf",
        help="hf: a transformers LLaVA folder (config, safetensors, tokenizer, processor)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from mm1.export.hf import export_hf
    from mm1.export.hf_layout import ExportError
    from mm1.train.checkpoint import CheckpointError

    try:
        layout = export_hf(args.checkpoint, args.out, overwrite=args.overwrite)
    except (ExportError, CheckpointError) as e:
        print(f"mm1 export: {e}", file=sys.stderr)
        return 2
    if layout.plain:
        print(
            f"mm1 export: wrote {args.out}: LlavaForConditionalGeneration ({layout.tower} tower, "
            f"{layout.text} LM); loads without remote code"
        )
    else:
        print(
            f"mm1 export: wrote {args.out}: LLaVA with mm1's projector in modeling_mm1_llava.py, load with "
            f"trust_remote_code=True ({layout.why_remote})"
        )
    return 0
