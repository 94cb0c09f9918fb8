"""Short-answer benchmarks as released: TextVQA, VizWiz, GQA (balanced questions) and POPE.

- TextVQA `TextVQA_0.5.1_{train,val}.json`: `{"data": [{question_id, question, image_id, answers
  (10 strings), ...}]}`; images `train_images/{image_id}.jpg` (val images live there too). VQA accuracy.
- VizWiz `{train,val}.json`: a list of `{image, question, answers: [{answer, answer_confidence}] x 10,
  answer_type, answerable}`. VQA accuracy, with "unanswerable" an ordinary answer (a tenth of val);
  the chat prompt tells the model it may say so, and `details` reports accuracy per answer type.
- GQA `{testdev,val,train}_balanced_questions.json`: `{question_id: {imageId, question, answer,
  fullAnswer, types: {structural, semantic, detailed}, ...}}`; images `images/{imageId}.jpg`.
  Exact match on the short answer (GQA's accuracy), broken down by structural type.
- POPE `coco_pope_{random,popular,adversarial}.json`: one JSON object per line, `{question_id, image,
  text, label: yes|no}`; images from COCO val2014 (`image_root`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mm1.eval.readers import Example, image_file, image_root, read_json, read_jsonl, register_format

VIZWIZ_CHAT = (
    "{image_lines}{question}\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
    "Answer the question using a single word or phrase."
)
YES_NO_CHAT = "{image_lines}{question}\nAnswer the question using a single word or phrase."


def _need(row: dict, keys: tuple[str, ...], where: str, layout: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: missing {missing} (expected the {layout} layout)")


def _one_image(root: Path, name: str, where: str) -> tuple[list[str], list[str]]:
    file = image_file(root, name, where)
    return [file], [file]


@register_format("textvqa", kind="vqa")
def read_textvqa(spec: Any, path: Path, split: str) -> list[Example]:
    data, root = read_json(path), image_root(spec, split, path)
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f'{path}: expected TextVQA\'s {{"data": [...]}} layout')
    out = []
    for n, row in enumerate(rows):
        where = f"{path} data[{n}]"
        _need(row, ("question_id", "question", "image_id"), where, "TextVQA")
        if not row.get("answers"):
            raise ValueError(f"{where}: no answers (TextVQA's test split has none; evaluate on val)")
        files, keys = _one_image(root, f"{row['image_id']}.jpg", where)
        out.append(
            Example(
                str(row["question_id"]),
                files,
                keys,
                question=str(row["question"]),
                answers=[str(a) for a in row["answers"]],
                meta={"set_name": row.get("set_name", "")},
            )
        )
    return out


@register_format("vizwiz", kind="vqa", chat_template=VIZWIZ_CHAT)
def read_vizwiz(spec: Any, path: Path, split: str) -> list[Example]:
    rows, root = read_json(path), image_root(spec, split, path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected VizWiz's layout, a JSON list of {{image, question, answers}}")
    out = []
    for n, row in enumerate(rows):
        where = f"{path}[{n}]"
        _need(row, ("image", "question", "answers"), where, "VizWiz")
        files, keys = _one_image(root, str(row["image"]), where)
        answers = [str(a["answer"]) if isinstance(a, dict) else str(a) for a in row["answers"]]
        meta = {k: row[k] for k in ("answer_type", "answerable") if k in row}
        out.append(
            Example(
                Path(str(row["image"])).stem, files, keys, question=str(row["question"]), answers=answers, meta=meta
            )
        )
    return out


@register_format("gqa", kind="vqa", metric="exact")
def read_gqa(spec: Any, path: Path, split: str) -> list[Example]:
    data, root = read_json(path), image_root(spec, split, path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected GQA's layout, a JSON object {{question_id: {{imageId, question, answer}}}}")
    out = []
    for qid, row in data.items():
        where = f"{path} question {qid}"
        _need(row, ("imageId", "question", "answer"), where, "GQA questions")
        files, keys = _one_image(root, f"{row['imageId']}.jpg", where)
        types = row.get("types") or {}
        out.append(
            Example(
                str(qid),
                files,
                keys,
                question=str(row["question"]),
                answers=[str(row["answer"])],
                meta={"type": types.get("structural", "")} if types else {},
            )
        )
    return out


@register_format("pope", kind="vqa", metric="pope", chat_template=YES_NO_CHAT)
def read_pope(spec: Any, path: Path, split: str) -> list[Example]:
    root, out = image_root(spec, split, path), []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        _need(row, ("question_id", "image", "text", "label"), where, "POPE")
        label = str(row["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{where}: label {row['label']!r}; POPE labels are yes or no")
        files, keys = _one_image(root, str(row["image"]), where)
        out.append(
            Example(
                str(row["question_id"]),
                files,
                keys,
                question=str(row["text"]),
                answers=[label],
                meta={"category": row.get("category", "")},
            )
        )
    return out
