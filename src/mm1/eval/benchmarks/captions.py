"""Captioning benchmarks as released: TextCaps (NoCaps is COCO-format: `mm1.eval.readers`).

TextCaps `TextCaps_0.1_{train,val}.json`: `{"data": [...]}` with one row per *caption* (an image
appears once per reference): `image_id`, `caption_str`, and in the val file `reference_strs` (all
of the image's references). Images are TextVQA's: `train_images/{image_id}.jpg`. An image's
references are its `reference_strs` when present, else the `caption_str` of all its rows; the test
file's rows carry no captions and are refused (evaluate on val). Scored with CIDEr-D.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mm1.eval.readers import Example, image_file, image_root, read_json, register_format


@register_format("textcaps", kind="caption")
def read_textcaps(spec: Any, path: Path, split: str) -> list[Example]:
    data, root = read_json(path), image_root(spec, split, path)
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f'{path}: expected TextCaps\' {{"data": [...]}} layout')
    refs: dict[str, list[str]] = {}
    given: dict[str, list[str]] = {}
    for n, row in enumerate(rows):
        if "image_id" not in row:
            raise ValueError(f"{path} data[{n}]: no image_id (expected the TextCaps layout)")
        key = str(row["image_id"])
        if row.get("reference_strs"):
            given[key] = [str(r) for r in row["reference_strs"]]
        if row.get("caption_str"):
            refs.setdefault(key, []).append(str(row["caption_str"]))
        else:
            refs.setdefault(key, [])
    out = []
    for key, captions in refs.items():
        answers = given.get(key) or captions
        if not answers:
            raise ValueError(f"{path}: image {key} has no captions (TextCaps' test split has none; evaluate on val)")
        file = image_file(root, f"{key}.jpg", f"{path} image {key}")
        out.append(Example(key, [file], [file], answers=answers))
    return out
