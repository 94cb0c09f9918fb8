"""MMMU as released: parquet, one file per subject and split (`Accounting/validation-00000-of-00001.parquet`).

Columns: `id`, `question` (with `<image 1>` ... placeholders), `options` (a Python list literal as
text; "[]" for open questions), `answer` (a letter, or for open questions the answer text or a list
literal of accepted answers), `question_type` ("multiple-choice" | "open"), `image_1` ... `image_7`
(structs `{bytes, path}`), `subfield`, ... A task's `test`/`train` is one parquet file or a folder
whose `*.parquet` files (at any depth) are all read: point `test:` at the validation files and
`train:` at the dev files, MMMU's few-shot pool.

Prompt (lmms-eval's): each `<image k>` becomes an `<image>` marker where it stands (images in the
order they are referred to; unreferenced ones are put first), options as "(A) text" lines, then
"Answer with the option's letter from the given choices directly." or, for an open question,
"Answer the question using a single word or phrase.". MMMU is scored by generating (`mc_mode:
generate` is fixed): the MMMU metric parses a letter for a multiple-choice question and applies the
open-answer rule to the others (`mm1.eval.bench_metrics`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mm1.eval.readers import Example, register_format

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
IMAGE_REF = re.compile(r"<image (\d+)>")
MAX_IMAGES = 7
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
OPEN_SUFFIX = "Answer the question using a single word or phrase."


def _literal_list(text: Any, where: str) -> list[str]:
    """MMMU stores lists as Python literals; read them as data, never as code."""
    if isinstance(text, list):
        return [str(x) for x in text]
    try:
        value = ast.literal_eval(str(text))
    except (ValueError, SyntaxError):
        raise ValueError(f"{where}: {str(text)[:60]!r} is not a list literal") from None
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
    return [str(x) for x in value]


def _image_bytes(cell: Any, where: str) -> bytes | None:
    if cell is None:
        return None
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"{where}: image column must hold {{bytes, path}} structs with the encoded image")
    return bytes(data)


def _parquet_files(src: Path) -> list[Path]:
    files = sorted(src.rglob("*.parquet")) if src.is_dir() else [src]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"{src}: no MMMU parquet file here (fix the task spec)")
    return files


def _example(row: dict[str, Any], where: str) -> Example:
    options = _literal_list(row.get("options") or "[]", f"{where} options")
    images = {k: _image_bytes(row.get(f"image_{k}"), f"{where} image_{k}") for k in range(1, MAX_IMAGES + 1)}
    body = str(row["question"]) + "".join(f"\n({LETTERS[i]}) {o}" for i, o in enumerate(options))
    refs = [int(k) for k in IMAGE_REF.findall(body)]
    for k in refs:
        if images.get(k) is None:
            raise ValueError(f"{where}: the question refers to <image {k}> but image_{k} is empty")
    unreferenced = [k for k, b in images.items() if b is not None and k not in refs]
    text = "<image>" * len(unreferenced) + IMAGE_REF.sub("<image>", body)
    order = unreferenced + refs
    answer = str(row.get("answer", ""))
    ex = Example(
        str(row["id"]),
        [images[k] for k in order],
        [f"{row['id']}#{k}" for k in order],
        question=text + "\n" + (MC_SUFFIX if options else OPEN_SUFFIX),
        meta={"question_type": row.get("question_type", ""), "subfield": row.get("subfield", "")},
    )
    if options:
        if answer not in LETTERS[: len(options)]:
            raise ValueError(f"{where}: answer {answer!r} is not one of the {len(options)} option letters")
        ex.options, ex.label = options, LETTERS.index(answer)
        ex.answers = [options[ex.label]]
    else:
        ex.answers = _literal_list(answer, f"{where} answer") if answer.startswith("[") else [answer]
    return ex


@register_format(
    "mmmu",
    kind="mc",
    metric="mmmu",
    mc_mode="generate",
    template="{question} Answer: {answer}",
    chat_template="{question}",
)
def read_mmmu(spec: Any, src: Path, split: str) -> list[Example]:
    out = []
    for file in _parquet_files(src):
        table = pq.read_table(file)
        missing = {"id", "question", "options", "answer"} - set(table.column_names)
        if missing:
            raise ValueError(f"{file}: missing MMMU columns {sorted(missing)}")
        for n, row in enumerate(table.to_pylist()):
            out.append(_example(row, f"{file} row {n}"))
    return out
