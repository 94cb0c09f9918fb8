"""`export_hf`: an mm1 checkpoint -> a transformers LLaVA folder.

    RUN or step dir --load_checkpoint--> MLLM + Config + Tokenizer
        --plan--> Layout (plain LLaVA, or LLaVA + mm1's projector module, or a refusal)
        --> OUT/ config.json  model.safetensors  tokenizer.json  tokenizer_config.json
                 chat_template.jinja  preprocessor_config.json  processor_config.json
                 generation_config.json  [modeling_mm1_llava.py]

The folder is written into a temporary sibling and renamed when complete, so OUT is never half
written. The checkpoint is read only through `mm1.train.load_checkpoint`, whatever its layout.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from safetensors.torch import save_file

from mm1.export.hf_files import write_text_files
from mm1.export.hf_layout import ExportError, Layout, plan
from mm1.export.hf_remote import MODULE, modeling_source, remote_config_fields
from mm1.export.hf_weights import llava_state_dict

log = logging.getLogger(__name__)


def export_hf(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Layout:
    """Write the HF folder for `checkpoint` (a run dir or a step dir) to `out`; returns the layout used."""
    from mm1.train import load_checkpoint

    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose a new folder or pass --overwrite")
    model, cfg, tok = load_checkpoint(checkpoint)
    if tok.image_id != cfg.model.image_token_id:
        raise ExportError(
            f"{checkpoint}: tokenizer's <image> id {tok.image_id} differs from "
            f"model.image_token_id={cfg.model.image_token_id}; the checkpoint is inconsistent"
        )
    layout = plan(cfg.model)
    remote = None
    if not layout.plain:
        remote = remote_config_fields(dataclasses.asdict(cfg.model.connector), layout.feature_norm)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(llava_state_dict(model, layout), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write_text_files(tmp, cfg, tok, layout, remote)
    if remote is not None:
        (tmp / f"{MODULE}.py").write_text(modeling_source(), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return layout
