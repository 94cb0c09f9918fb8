"""Save arbitrary training state (optimizer, scheduler, RNG, data position) without pickle.

`torch.save` pickles, and unpickling a downloaded checkpoint runs whatever code it names. Here a
nested state is split into a JSON tree and a flat dict of tensors: tensors go to a safetensors file,
everything else must be plain data (dict, list, tuple, str, int, float, bool, None, NumPy arrays and
scalars). Loading reads JSON and safetensors only, so nothing in a checkpoint can execute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def encode(obj: Any, tensors: dict[str, torch.Tensor], path: str = "s") -> Any:
    """A JSON-able tree for `obj`; tensors are moved into `tensors` under their tree path."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if hasattr(t, "full_tensor"):  # a DTensor that slipped through: store the whole value
            t = t.full_tensor()
        tensors[path] = t.cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj)).clone()
        return {"__ndarray__": path, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}}
        # non-string keys (e.g. torch's integer parameter ids): keep them with their type
        return {
            "__items__": [
                [encode(k, tensors, f"{path}.k{i}"), encode(v, tensors, f"{path}.{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    raise TypeError(
        f"cannot checkpoint a value of type {type(obj).__name__} at {path}: training state "
        "must be plain data (dict/list/tuple/str/number/bool/None), tensors or NumPy arrays"
    )


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Invert `encode`."""
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return tensors[tree["__ndarray__"]].numpy().astype(tree["dtype"], copy=True)
    if "__dict__" in tree:
        return {k: decode(v, tensors) for k, v in tree["__dict__"].items()}
    if "__items__" in tree:
        return {decode(k, tensors): decode(v, tensors) for k, v in tree["__items__"]}
    if "__tuple__" in tree:
        return tuple(decode(v, tensors) for v in tree["__tuple__"])
    raise ValueError(f"unrecognised state node with keys {sorted(tree)}")


def write_state(obj: Any, directory: Path, name: str) -> list[str]:
    """Write `obj` as NAME.json (+ NAME.safetensors when it holds tensors); returns the file names."""
    tensors: dict[str, torch.Tensor] = {}
    tree = encode(obj, tensors)
    files = [f"{name}.json"]
    write_text(directory / files[0], json.dumps(tree))
    if tensors:
        files.append(f"{name}.safetensors")
        save_file(tensors, str(directory / files[1]))
    return files


def read_state(directory: Path, name: str) -> Any:
    """Read what `write_state` wrote."""
    tree = json.loads((directory / f"{name}.json").read_text())
    st = directory / f"{name}.safetensors"
    tensors = load_file(str(st)) if st.exists() else {}
    return decode(tree, tensors)


def write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
