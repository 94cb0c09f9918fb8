"""Multiple-choice benchmarks as released: ScienceQA-IMG, SEED-Bench (image part) and MMBench.

- ScienceQA `problems.json`: `{pid: {question, choices, answer: index, hint, image: name|null,
  split: train|val|test, subject, ...}}`; images `images/{split}/{pid}/{image}`. A task's test
  split reads the problems whose `split` is "test", its train split those marked "train"; only
  problems with an image are kept (ScienceQA-IMG). A non-empty hint is the question's context.
- SEED-Bench `SEED-Bench.json`: `{question_type: {name: id}, questions: [{question_id, question,
  choice_a..choice_d, answer: letter, data_id, data_type, question_type_id}]}`; the image questions
  (`data_type: image`) read `SEED-Bench-image/{data_id}` (the default image_root).
- MMBench TSV (`MMBench_DEV_EN.tsv` ...): columns `index, question, hint, A, B, C, D, answer,
  category, image, ...`, the image as base64 or, in a circular copy, the `index` of the row holding
  it. CircularEval asks a question once per rotation of its options; a file that already holds the
  rotations (indices `k * 1_000_000 + i`) is read as is, otherwise mm1 makes them. The rotations of
  one question share an image key, so a demonstration is never a rotation of its query.
"""

from __future__ import annotations

import base64
import binascii
import csv
from pathlib import Path
from typing import Any

from mm1.eval.readers import Example, image_file, image_root, read_json, register_format

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CIRCULAR = 1_000_000  # MMBench: index of rotation k of question i = k * CIRCULAR + i
MAX_IMAGE_BASE64 = 64 * 1024 * 1024  # a larger field is refused (a bounded read of untrusted input)


@register_format("scienceqa", kind="mc")
def read_scienceqa(spec: Any, path: Path, split: str) -> list[Example]:
    problems, root = read_json(path), image_root(spec, split, path)
    if not isinstance(problems, dict):
        raise ValueError(f"{path}: expected ScienceQA's problems.json layout, {{pid: {{question, choices, ...}}}}")
    out = []
    for pid, p in problems.items():
        if p.get("split") != split or not p.get("image"):
            continue
        where = f"{path} problem {pid}"
        choices, answer = p.get("choices"), p.get("answer")
        if not isinstance(choices, list) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: needs choices (a list) and answer (an index into it)")
        file = image_file(root, f"{split}/{pid}/{p['image']}", where)
        hint = str(p.get("hint") or "").strip()
        question = f"Context: {hint}\n{p['question']}" if hint else str(p["question"])
        out.append(
            Example(
                str(pid),
                [file],
                [file],
                question=question,
                options=[str(c) for c in choices],
                label=answer,
                answers=[str(choices[answer])],
                meta={"category": p.get("subject", "")},
            )
        )
    if not out:
        raise ValueError(f"{path}: no problems with an image in split {split!r}")
    return out


@register_format("seed_bench", kind="mc")
def read_seed_bench(spec: Any, path: Path, split: str) -> list[Example]:
    data = read_json(path)
    root = image_root(spec, split, path) if spec.image_root else path.parent / "SEED-Bench-image"
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ValueError(f"{path}: expected SEED-Bench's layout, {{question_type: {{}}, questions: [...]}}")
    type_names = {v: k for k, v in (data.get("question_type") or {}).items()}
    out = []
    for n, q in enumerate(data["questions"]):
        if q.get("data_type", "image") != "image":
            continue  # the video questions need frames, not one image
        where = f"{path} questions[{n}]"
        options = [str(q[f"choice_{c}"]) for c in "abcdefgh" if f"choice_{c}" in q]
        answer = str(q.get("answer", ""))
        if len(options) < 2 or answer not in LETTERS[: len(options)]:
            raise ValueError(f"{where}: needs choice_a, choice_b, ... and answer = one of their letters")
        data_id = str(q["data_id"])
        file = image_file(root, data_id if Path(data_id).suffix else f"{data_id}.jpg", where)
        label = LETTERS.index(answer)
        out.append(
            Example(
                str(q["question_id"]),
                [file],
                [file],
                question=str(q["question"]),
                options=options,
                label=label,
                answers=[options[label]],
                meta={"category": type_names.get(q.get("question_type_id"), q.get("question_type_id"))},
            )
        )
    return out


def _tsv_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: eval file not found (fix the task spec)")
    csv.field_size_limit(MAX_IMAGE_BASE64)
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _present(value: str | None) -> bool:
    return value is not None and value.strip() not in ("", "nan", "NaN", "None")


def _decode_image(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: the image column is neither base64 nor the index of another row") from None


@register_format("mmbench", kind="mc", metric="circular")
def read_mmbench(spec: Any, path: Path, split: str) -> list[Example]:
    rows = _tsv_rows(path)
    if not rows or not {"index", "question", "A", "B", "answer", "image"} <= set(rows[0]):
        raise ValueError(f"{path}: expected MMBench's TSV columns index, question, hint, A, B, C, D, answer, image")
    images = {r["index"]: r["image"] for r in rows if len(r["image"] or "") > 64}  # the rest reference these
    has_rotations = any(int(r["index"]) >= CIRCULAR for r in rows)
    out = []
    for r in rows:
        index, where = int(r["index"]), f"{path} index {r['index']}"
        options = [r[c] for c in LETTERS if c in r and _present(r[c])]
        if r["answer"] not in LETTERS[: len(options)]:
            raise ValueError(f"{where}: answer {r['answer']!r} is not one of the {len(options)} option letters")
        image = _decode_image(images.get(r["image"], r["image"]), where)
        hint = r.get("hint")
        question = f"{hint}\n{r['question']}" if _present(hint) else r["question"]
        group, shift = index % CIRCULAR, index // CIRCULAR
        key = f"{path}#{group}"
        shifts = [shift] if has_rotations else range(len(options))
        for s in shifts:
            opts = options if has_rotations else options[s:] + options[:s]
            label = LETTERS.index(r["answer"]) if has_rotations else (LETTERS.index(r["answer"]) - s) % len(options)
            out.append(
                Example(
                    str(s * CIRCULAR + group),
                    [image],
                    [key],
                    question=question,
                    options=opts,
                    label=label,
                    answers=[opts[label]],
                    meta={"circular_group": group, "circular_shift": s, "category": r.get("category", "")},
                )
            )
    return out
