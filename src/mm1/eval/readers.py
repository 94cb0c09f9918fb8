"""Eval file formats: one registered reader per released benchmark layout.

A reader turns a task's split source (a path, or a small dict of paths) into `Example`s. Each is
registered under the name a task spec gives as `format:` together with the task kind and metric
that layout implies, so `format: pope` alone makes a POPE task. mm1's own layouts live here
(COCO captions JSON, VQAv2 questions + annotations, mm1's JSONL); the released benchmark layouts
(TextVQA, VizWiz, GQA, TextCaps, NoCaps, ScienceQA, SEED-Bench, MMMU, POPE, MMBench) live in
`mm1.eval.benchmarks`. Image files resolve against the task's `image_root` (default: the data
file's folder); images embedded in the data (MMMU parquet, MMBench base64) stay in memory as bytes
and are decoded like files (JPEG/PNG/WEBP only).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm1.data.safety import ReadPolicy, inside_root
from mm1.data.skips import DataError
from mm1.registry import ConfigError, Registry


@dataclass
class Example:
    """One evaluation item. `image_keys` identify the images (their resolved file paths: dataset image
    ids repeat across splits) so the few-shot sampler keeps a query's own image out of its demos."""

    id: str
    images: list[Any] = field(default_factory=list)  # image files (or encoded bytes: MMMU, MMBench), prompt order
    image_keys: list[str] = field(default_factory=list)
    question: str = ""
    answers: list[str] = field(default_factory=list)  # caption refs / VQA annotators / [answer]
    options: list[str] = field(default_factory=list)
    label: int = -1  # gold option index (mc)
    rationale: str = ""  # few-shot chain-of-thought demonstrations
    meta: dict[str, Any] = field(default_factory=dict)  # question_type, answer_type, ...

    @property
    def target(self) -> str:
        """The answer a demonstration shows: the majority annotator answer, the first caption
        (demonstrations re-draw captions, see fewshot), or the gold option."""
        if self.options and self.label >= 0:
            return self.options[self.label]
        if self.meta.get("multiple_choice_answer"):
            return str(self.meta["multiple_choice_answer"])
        return Counter(self.answers).most_common(1)[0][0] if self.answers else ""


Reader = Callable[[Any, Any, str], list[Example]]  # (spec, split source, "train" | "test") -> examples


@dataclass(frozen=True)
class Format:
    """A registered layout: its reader and the task settings it implies (empty = the kind's default)."""

    read: Reader
    kind: str = ""  # "" = any kind (the spec must name one)
    metric: str = ""
    template: str = ""
    chat_template: str = ""
    mc_mode: str = ""  # "generate" when the metric needs free text (MMMU's open questions)


FORMATS: Registry[Format] = Registry("eval file format", "format")


def register_format(name: str, **settings: str) -> Callable[[Reader], Reader]:
    def decorate(read: Reader) -> Reader:
        FORMATS.register(name)(Format(read, **settings))
        return read

    return decorate


def default_format(kind: str, src: Any) -> str:
    """The layout a spec without `format:` is read in (mm1's original behaviour)."""
    if kind == "vqa":
        return "vqav2"
    return "coco_captions" if kind == "caption" and str(src).endswith(".json") else "jsonl"


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: eval file not found (build the world with `mm1 world`, or fix the task spec)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: eval file not found (build the world with `mm1 world`, or fix the task spec)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    return rows


def image_root(spec: Any, split: str, data_file: Path) -> Path:
    root = spec.image_root
    if isinstance(root, dict):
        root = root.get(split)
    return Path(root) if root else data_file.parent


# whether image names may leave the task's image root; set by `read_task_files` from the task spec
# (or data.allow_outside_paths), so each format's reader need not pass it along
OUTSIDE_PATHS_ALLOWED: ContextVar[bool] = ContextVar("outside_paths_allowed", default=False)


@contextlib.contextmanager
def read_task_files(allow_outside_paths: bool) -> Iterator[None]:
    token = OUTSIDE_PATHS_ALLOWED.set(allow_outside_paths)
    try:
        yield
    finally:
        OUTSIDE_PATHS_ALLOWED.reset(token)


def image_file(root: Path, name: str, where: str) -> str:
    """Image file names resolve against the root, then its `images/` folder (the world's layout),
    and must stay inside the root (`mm1.data.safety.inside_root`: a task file from the web may name
    `../../etc/passwd`) unless the spec or data.allow_outside_paths allows it."""
    policy = ReadPolicy(allow_outside_paths=OUTSIDE_PATHS_ALLOWED.get())
    p = Path(name)
    for cand in [p] if p.is_absolute() else [root / p, root / "images" / p]:
        _, refused = inside_root(str(cand.absolute()), str(root), policy)
        if refused:
            raise DataError(f"{where}: image {refused}; or set allow_outside_paths: true in the task spec")
        if cand.is_file():
            return str(cand.resolve())
    raise FileNotFoundError(
        f"{where}: image {name!r} not found under {root} (or {root / 'images'}); set image_root in the task spec"
    )


@register_format("coco_captions", kind="caption")
@register_format("nocaps", kind="caption")  # nocaps_val_4500_captions.json is COCO-format
def read_coco_captions(spec: Any, path: Path, split: str) -> list[Example]:
    data, root = read_json(path), image_root(spec, split, path)
    refs: dict[Any, list[str]] = {}
    for n, ann in enumerate(data.get("annotations", [])):
        if "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"{path}: annotations[{n}] needs image_id and caption (COCO captions format)")
        refs.setdefault(ann["image_id"], []).append(str(ann["caption"]))
    out = []
    for img in data.get("images", []):
        if img["id"] not in refs:
            continue  # an image without references cannot be scored
        file = image_file(root, img.get("file_name") or img.get("image", ""), f"{path} image id {img['id']}")
        meta = {"domain": img["domain"]} if "domain" in img else {}  # NoCaps: in-, near-, out-domain
        out.append(Example(str(img["id"]), [file], [file], answers=refs[img["id"]], meta=meta))
    if not out:
        raise ValueError(f"{path}: no images with captions (expected COCO format: images[], annotations[])")
    return out


@register_format("vqav2", kind="vqa")
def read_vqav2(spec: Any, src: Any, split: str) -> list[Example]:
    if not isinstance(src, dict) or not {"questions", "annotations"} <= set(src):
        raise ConfigError(f"task {spec.name}: a vqa split needs {{questions: path, annotations: path}}, got {src!r}")
    qpath, apath = Path(src["questions"]), Path(src["annotations"])
    questions, anns = read_json(qpath), read_json(apath)
    by_qid = {a["question_id"]: a for a in anns.get("annotations", [])}
    root, out = image_root(spec, split, qpath), []
    for q in questions.get("questions", []):
        ann = by_qid.get(q["question_id"])
        if ann is None:
            raise ValueError(f"{apath}: no annotation for question_id {q['question_id']} of {qpath}")
        name = (
            q.get("image")
            or q.get("file_name")
            or (spec.image_pattern.format(image_id=q["image_id"]) if spec.image_pattern else None)
        )
        if name is None:
            raise ConfigError(
                f"task {spec.name}: {qpath} questions carry only image_id; "
                "set image_pattern (e.g. 'COCO_val2014_{image_id:012d}.jpg') and image_root"
            )
        file = image_file(root, name, f"{qpath} question {q['question_id']}")
        answers = [str(a["answer"]) if isinstance(a, dict) else str(a) for a in ann["answers"]]
        meta = {k: ann[k] for k in ("question_type", "answer_type", "multiple_choice_answer") if k in ann}
        out.append(
            Example(
                str(q["question_id"]),
                [file],
                [file],
                question=q["question"],
                answers=answers,
                rationale=str(ann.get("rationale", q.get("rationale", ""))),
                meta=meta,
            )
        )
    return out


@register_format("jsonl")
def read_mm1_jsonl(spec: Any, path: Path, split: str) -> list[Example]:
    root, out = image_root(spec, split, path), []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        imgs = row.get("images", [row["image"]] if row.get("image") else [])
        files = [image_file(root, str(i), where) for i in imgs]
        if spec.kind in ("multi", "caption", "vqa") and not files:
            raise ValueError(f"{where}: a {spec.kind} example needs images")
        ans = row.get("answers", row.get("captions", row.get("answer", "")))
        ex = Example(
            str(row.get("id", row.get("question_id", n))),
            files,
            files,
            question=str(row.get("question", row.get("prompt", ""))),
            rationale=str(row.get("rationale", "")),
            meta={k: v for k, v in row.items() if k in ("question_type", "type", "answer_type")},
        )
        if spec.kind == "mc":
            opts = row.get("options")
            if not isinstance(opts, list) or len(opts) < 2 or not isinstance(ans, int) or not 0 <= ans < len(opts):
                raise ValueError(f"{where}: multiple choice needs options (>= 2 strings) and answer = an option index")
            ex.options, ex.label, ex.answers = [str(o) for o in opts], ans, [str(opts[ans])]
        elif spec.metric == "perplexity":
            ex.answers = [str(row.get("text", ans))]
        else:
            ex.answers = [str(a) for a in ans] if isinstance(ans, list) else [str(ans)]
            if not ex.answers or ex.answers == [""]:
                raise ValueError(f"{where}: needs an answer")
        out.append(ex)
    return out
