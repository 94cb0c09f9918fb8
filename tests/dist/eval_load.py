"""Run in a fresh process: host memory of loading a checkpoint for evaluation. argv: CKPT OUT.json.
Measures, one after the other, `load_checkpoint` in bf16 (the weights go straight into bf16 tensors)
and the whole fp32 state dict read at once (what a load through a full host copy costs).

The measure is the process's anonymous memory (RssAnon), sampled by a thread while the load runs:
safetensors maps the files, and mapped file pages count in the peak RSS though they are page cache
the kernel can drop, not memory the process holds."""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from pathlib import Path

import torch

from mm1.train.checkpoint import load_checkpoint, read_checkpoint_weights


def anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def growth(fn) -> float:
    """Largest growth of anonymous memory while `fn` runs (its result kept until the end)."""
    gc.collect()
    before = anon_mb()
    peak, done = [before], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon_mb())
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    kept = fn()
    done.set()
    watcher.join()
    out = max(peak[0], anon_mb()) - before
    del kept
    return out


def main(ckpt: str, out: str) -> None:
    load_checkpoint(ckpt, verify=False)  # imports, tokenizer and DCP machinery: not the weights' memory
    bf16 = growth(lambda: load_checkpoint(ckpt, verify=False, dtype=torch.bfloat16))
    full = growth(lambda: read_checkpoint_weights(ckpt))
    with open(out, "w") as f:
        json.dump({"bf16_load_mb": bf16, "fp32_state_dict_mb": full}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
