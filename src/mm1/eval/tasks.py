"""Evaluation tasks: what to ask, from which files, scored how.

A task is a `TaskSpec` (kind, train/test files, prompt template, metric, generation settings) and
its examples, read from the formats real benchmarks ship in:

| kind      | files                                                        | metric                      |
|-----------|--------------------------------------------------------------|-----------------------------|
| caption   | COCO captions JSON (`images` + `annotations`)                | CIDEr-D                     |
| vqa       | VQAv2 questions JSON + annotations JSON (`answers` x 10)     | VQA accuracy (or exact)     |
| mc        | JSONL `{image(s), question, options, answer: index}`         | option log-likelihood acc.  |
| text      | JSONL `{question, answer}` (or `{text}` for perplexity)      | exact match / perplexity    |
| multi     | JSONL `{images: [...], question, answer}`                    | exact match                 |

The synthetic world's sets are registered by name (`world_caption` ...); a real dataset is a small
YAML/JSON spec with paths (see `load_spec`), e.g. for COCO Karpathy val or VQAv2 from local copies.
Examples are read lazily and cached per task, so registering costs nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from mm1.registry import ConfigError, Registry

KINDS = ("caption", "vqa", "mc", "text", "multi")
METRICS = ("cider", "vqa", "exact", "option", "perplexity")
DEFAULT_METRIC = {"caption": "cider", "vqa": "vqa", "mc": "option", "text": "exact", "multi": "exact"}
DEFAULT_TEMPLATE = {
    "caption": "<image>A short description: {caption}",
    "vqa": "<image>Question: {question} Short answer: {answer}",
    "mc": "<image>Question: {question} Answer: {answer}",
    "text": "Question: {question} Answer: {answer}",
    "multi": "{images}Question: {question} Short answer: {answer}",
}
# eval.chat (models after SFT): the user turn, LLaVA-style; the assistant turn is the answer
SHORT = "Answer the question using a single word or phrase."
DEFAULT_CHAT_TEMPLATE = {
    "caption": "{image_lines}Give a short caption for this image.",
    "vqa": "{image_lines}{question}\n" + SHORT,
    "mc": "{image_lines}{question}\n" + SHORT,
    "text": "{question}\n" + SHORT,
    "multi": "{image_lines}{question}\n" + SHORT,
}


@dataclass
class Example:
    """One evaluation item. `image_keys` identify the images (their resolved file paths: dataset image
    ids repeat across splits) so the few-shot sampler keeps a query's own image out of its demos."""

    id: str
    images: list[str] = field(default_factory=list)  # image files, in prompt order
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


@dataclass
class TaskSpec:
    name: str
    kind: str
    test: Any  # a path, or for vqa {questions: path, annotations: path}
    train: Any = None  # demonstrations come from here; None = zero-shot only
    image_root: Any = None  # dir (or {train: dir, test: dir}) that image file names are relative to
    image_pattern: str = ""  # VQAv2: file name from the image id, e.g. "COCO_val2014_{image_id:012d}.jpg"
    metric: str = ""  # default by kind
    template: str = ""  # default by kind; fields {caption} {question} {answer} {rationale} {options} {images}
    chat_template: str = ""  # the user turn under eval.chat; default by kind; {image_lines} = "<image>\n" per image
    separator: str = "\n"  # between demonstrations and before the query
    prefix: str = ""  # instruction text before everything (also at zero-shot)
    zero_shot_demos: int = 0  # Flamingo's trick: text-only demonstrations at 0 shots (images removed)
    max_new_tokens: int = 0  # 0 = eval.max_new_tokens
    stop: list[str] = field(default_factory=lambda: ["\n"])  # generation ends at the first of these
    cot_marker: str = ""  # chain-of-thought: the answer is what follows the last marker
    lowercase: bool = False  # post-processing of generated answers

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name}: kind={self.kind!r}; allowed: {', '.join(KINDS)}")
        self.metric = self.metric or DEFAULT_METRIC[self.kind]
        if self.metric not in METRICS:
            raise ConfigError(f"task {self.name}: metric={self.metric!r}; allowed: {', '.join(METRICS)}")
        self.template = self.template or DEFAULT_TEMPLATE[self.kind]
        self.chat_template = self.chat_template or DEFAULT_CHAT_TEMPLATE[self.kind]
        if self.cot_marker and "{rationale}" not in self.template:
            raise ConfigError(f"task {self.name}: cot_marker is set but the template has no {{rationale}} field, "
                              "e.g. '<image>Question: {question} Reasoning: {rationale} So the answer is {answer}'")


class Task:
    """A spec plus its examples (read on first use)."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self._splits: dict[str, list[Example]] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    def split(self, which: str) -> list[Example]:
        if which not in self._splits:
            src = self.spec.test if which == "test" else self.spec.train
            self._splits[which] = [] if src is None else read_examples(self.spec, src, which)
        return self._splits[which]

    @property
    def test(self) -> list[Example]:
        return self.split("test")

    @property
    def train(self) -> list[Example]:
        return self.split("train")


# ----------------------------------------------------------------------------- readers


def _json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: eval file not found (build the world with `mm1 world`, or fix the task spec)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def _jsonl(path: Path) -> list[tuple[int, dict]]:
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


def _root(spec: TaskSpec, split: str, data_file: Path) -> Path:
    root = spec.image_root
    if isinstance(root, dict):
        root = root.get(split)
    return Path(root) if root else data_file.parent


def _image_path(root: Path, name: str, where: str) -> str:
    """Image file names resolve against the root, then its `images/` folder (the world's layout)."""
    p = Path(name)
    for cand in [p] if p.is_absolute() else [root / p, root / "images" / p]:
        if cand.is_file():
            return str(cand.resolve())
    raise FileNotFoundError(f"{where}: image {name!r} not found under {root} (or {root / 'images'}); "
                            "set image_root in the task spec")


def _read_caption(spec: TaskSpec, path: Path, split: str) -> list[Example]:
    data, root = _json(path), _root(spec, split, path)
    refs: dict[Any, list[str]] = {}
    for n, ann in enumerate(data.get("annotations", [])):
        if "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"{path}: annotations[{n}] needs image_id and caption (COCO captions format)")
        refs.setdefault(ann["image_id"], []).append(str(ann["caption"]))
    out = []
    for img in data.get("images", []):
        if img["id"] not in refs:
            continue  # an image without references cannot be scored
        file = _image_path(root, img.get("file_name") or img.get("image", ""), f"{path} image id {img['id']}")
        out.append(Example(str(img["id"]), [file], [file], answers=refs[img["id"]]))
    if not out:
        raise ValueError(f"{path}: no images with captions (expected COCO format: images[], annotations[])")
    return out


def _read_vqa(spec: TaskSpec, src: Any, split: str) -> list[Example]:
    if not isinstance(src, dict) or not {"questions", "annotations"} <= set(src):
        raise ConfigError(f"task {spec.name}: a vqa split needs {{questions: path, annotations: path}}, got {src!r}")
    qpath, apath = Path(src["questions"]), Path(src["annotations"])
    questions, anns = _json(qpath), _json(apath)
    by_qid = {a["question_id"]: a for a in anns.get("annotations", [])}
    root, out = _root(spec, split, qpath), []
    for q in questions.get("questions", []):
        ann = by_qid.get(q["question_id"])
        if ann is None:
            raise ValueError(f"{apath}: no annotation for question_id {q['question_id']} of {qpath}")
        name = q.get("image") or q.get("file_name") or (spec.image_pattern.format(image_id=q["image_id"])
                                                         if spec.image_pattern else None)
        if name is None:
            raise ConfigError(f"task {spec.name}: {qpath} questions carry only image_id; "
                              "set image_pattern (e.g. 'COCO_val2014_{image_id:012d}.jpg') and image_root")
        file = _image_path(root, name, f"{qpath} question {q['question_id']}")
        answers = [str(a["answer"]) if isinstance(a, dict) else str(a) for a in ann["answers"]]
        meta = {k: ann[k] for k in ("question_type", "answer_type", "multiple_choice_answer") if k in ann}
        out.append(Example(str(q["question_id"]), [file], [file], question=q["question"],
                           answers=answers, rationale=str(ann.get("rationale", q.get("rationale", ""))), meta=meta))
    return out


def _read_jsonl(spec: TaskSpec, path: Path, split: str) -> list[Example]:
    root, out = _root(spec, split, path), []
    for n, row in _jsonl(path):
        where = f"{path}:{n}"
        imgs = row.get("images", [row["image"]] if row.get("image") else [])
        files = [_image_path(root, str(i), where) for i in imgs]
        if spec.kind in ("multi", "caption", "vqa") and not files:
            raise ValueError(f"{where}: a {spec.kind} example needs images")
        ans = row.get("answers", row.get("captions", row.get("answer", "")))
        ex = Example(str(row.get("id", row.get("question_id", n))), files, files,
                     question=str(row.get("question", row.get("prompt", ""))), rationale=str(row.get("rationale", "")),
                     meta={k: v for k, v in row.items() if k in ("question_type", "type", "answer_type")})
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


def read_examples(spec: TaskSpec, src: Any, split: str) -> list[Example]:
    if spec.kind == "vqa":
        return _read_vqa(spec, src, split)
    path = Path(src)
    if spec.kind == "caption" and path.suffix == ".json":
        return _read_caption(spec, path, split)
    return _read_jsonl(spec, path, split)


# ----------------------------------------------------------------------------- registry and specs

TASKS: Registry[Callable[[Path], TaskSpec]] = Registry("eval task", "eval.tasks")


def _world(kind: str, stem: str, **kw: Any) -> Callable[[Path], TaskSpec]:
    def build(world: Path) -> TaskSpec:
        ev = world / "eval"
        if kind == "vqa":
            split = {s: {"questions": ev / f"{stem}_{s}_questions.json", "annotations": ev / f"{stem}_{s}_annotations.json"}
                     for s in ("train", "test")}
            return TaskSpec(f"world_{stem}", kind, split["test"], split["train"], image_root=ev, **kw)
        ext = "json" if kind == "caption" else "jsonl"
        return TaskSpec(f"world_{stem}", kind, ev / f"{stem}_test.{ext}", ev / f"{stem}_train.{ext}", image_root=ev, **kw)
    return build


TASKS.register("world_caption")(_world("caption", "caption"))
TASKS.register("world_vqa")(_world("vqa", "vqa"))
TASKS.register("world_text")(_world("text", "text"))
TASKS.register("world_multi")(_world("multi", "multi"))
TASKS.register("world_mc")(_world("mc", "mc"))


def load_spec(path: str | Path) -> TaskSpec:
    """A task spec file (YAML or JSON). Relative paths are relative to the spec file. Example:

        name: coco_karpathy
        kind: caption
        train: /data/coco/captions_train2014.json
        test: /data/coco/captions_val2014.json
        image_root: {train: /data/coco/train2014, test: /data/coco/val2014}
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML/JSON: {e}") from None
    if not isinstance(data, dict) or "kind" not in data or "test" not in data:
        raise ConfigError(f"{path}: a task spec needs at least `kind` ({'|'.join(KINDS)}) and `test`")
    allowed = {f.name for f in fields(TaskSpec)}
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"{path}: unknown task spec keys {sorted(unknown)}; allowed: {sorted(allowed)}")

    def rel(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: rel(x) for k, x in v.items()}
        return None if v is None else (path.parent / str(v)).resolve()

    for key in ("test", "train", "image_root"):
        if data.get(key) is not None:
            data[key] = rel(data[key])
    data.setdefault("name", path.stem)
    return TaskSpec(**data)


def get_task(name: str, world: str | Path = "data/world-tiny") -> Task:
    """A registered task name (world tasks read `world`), or the path of a YAML/JSON task spec."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml", ".json") and p.is_file():
        return Task(load_spec(p))
    return Task(TASKS.get(name)(Path(world)))
