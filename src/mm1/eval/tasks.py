"""Evaluation tasks: what to ask, from which files, scored how.

A task is a `TaskSpec` (kind, train/test files in a registered `format`, prompt template, metric,
generation settings) and its examples. mm1's own layouts:

| kind      | format (default)                                                 | metric                      |
|-----------|------------------------------------------------------------------|-----------------------------|
| caption   | coco_captions: COCO captions JSON (`images` + `annotations`)     | CIDEr-D                     |
| vqa       | vqav2: questions JSON + annotations JSON (`answers` x 10)        | VQA accuracy (or exact)     |
| mc        | jsonl: `{image(s), question, options, answer: index}`            | option accuracy             |
| text      | jsonl: `{question, answer}` (or `{text}` for perplexity)         | exact match / perplexity    |
| multi     | jsonl: `{images: [...], question, answer}`                       | exact match                 |

Released benchmark layouts are further formats (`mm1.eval.benchmarks`): a spec with `format: pope`
needs no kind or metric. Multiple choice is scored by option log-likelihood (`mc_mode: loglik`) or
by generating a letter and parsing it (`generate`, lmms-eval's way); `eval.mc_mode` picks for
tasks whose spec leaves it open. The synthetic world's sets are registered by name (`world_caption`
...); a real dataset is a small YAML/JSON spec with paths (see `load_spec`). Examples are read
lazily and cached per task, so registering costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

import mm1.eval.benchmarks  # noqa: F401  (registers the released benchmark formats)
from mm1.eval.readers import FORMATS, Example, default_format, read_task_files
from mm1.eval.task_metrics import SCORERS
from mm1.registry import ConfigError, Registry, check, one_of

__all__ = ["Example", "Task", "TaskSpec", "TASKS", "check_eval_options", "get_task", "load_spec"]

KINDS = ("caption", "vqa", "mc", "text", "multi")
MC_MODES = ("loglik", "generate")
DEFAULT_METRIC = {"caption": "cider", "vqa": "vqa", "mc": "option", "text": "exact", "multi": "exact"}
LETTER = "Answer with the option's letter from the given choices directly."
DEFAULT_TEMPLATE = {
    "caption": "<image>A short description: {caption}",
    "vqa": "<image>Question: {question} Short answer: {answer}",
    "mc": "<image>Question: {question} Answer: {answer}",
    "mc/generate": "<image>Question: {question}\n{options}\n" + LETTER + " Answer: {answer}",
    "text": "Question: {question} Answer: {answer}",
    "multi": "{images}Question: {question} Short answer: {answer}",
}
# eval.chat (models after SFT): the user turn, LLaVA-style; the assistant turn is the answer
SHORT = "Answer the question using a single word or phrase."
DEFAULT_CHAT_TEMPLATE = {
    "caption": "{image_lines}Give a short caption for this image.",
    "vqa": "{image_lines}{question}\n" + SHORT,
    "mc": "{image_lines}{question}\n" + SHORT,
    "mc/generate": "{image_lines}{question}\n{options}\n" + LETTER,
    "text": "{question}\n" + SHORT,
    "multi": "{image_lines}{question}\n" + SHORT,
}


@dataclass
class TaskSpec:
    name: str
    kind: str  # "" = the format's kind
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
    format: str = ""  # a registered file layout (readers.FORMATS); "" = mm1's layout for the kind
    mc_mode: str = ""  # multiple choice: loglik | generate; "" = eval.mc_mode
    allow_outside_paths: bool = False  # image names may leave image_root (or the task file's folder)
    defaulted: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)
    question_types: list[str] = field(default_factory=list)  # keep only these `question_type`s (e.g. label)

    def __post_init__(self) -> None:
        fmt = FORMATS.get(self.format) if self.format else None
        if fmt is not None and fmt.kind:
            if self.kind and self.kind != fmt.kind:
                raise ConfigError(
                    f"task {self.name}: format {self.format!r} is a {fmt.kind} task, not kind={self.kind!r}; "
                    "drop `kind` from the spec"
                )
            self.kind = fmt.kind
        if self.kind not in KINDS:
            raise ConfigError(
                f"task {self.name}: kind={self.kind!r}; allowed: {', '.join(KINDS)} "
                f"(or a format: {', '.join(FORMATS.names())})"
            )
        self.mc_mode = self.mc_mode or (fmt.mc_mode if fmt else "")
        if self.mc_mode not in ("",) + MC_MODES:
            raise ConfigError(f"task {self.name}: mc_mode={self.mc_mode!r}; allowed: {', '.join(MC_MODES)}")
        self.defaulted = tuple(k for k in ("metric", "template", "chat_template") if not getattr(self, k))
        key = "mc/generate" if self.kind == "mc" and self.mc_mode == "generate" else self.kind
        self.metric = self.metric or (fmt.metric if fmt else "") or DEFAULT_METRIC[self.kind]
        if self.metric not in SCORERS and self.metric != "perplexity":
            raise ConfigError(
                f"task {self.name}: metric={self.metric!r}; allowed: {', '.join(SCORERS.names())}, perplexity"
            )
        self.template = self.template or (fmt.template if fmt else "") or DEFAULT_TEMPLATE[key]
        self.chat_template = self.chat_template or (fmt.chat_template if fmt else "") or DEFAULT_CHAT_TEMPLATE[key]
        if self.cot_marker and "{rationale}" not in self.template:
            raise ConfigError(
                f"task {self.name}: cot_marker is set but the template has no {{rationale}} field, "
                "e.g. '<image>Question: {question} Reasoning: {rationale} So the answer is {answer}'"
            )

    def with_mc_mode(self, mode: str) -> TaskSpec:
        """The spec with a multiple-choice mode, its defaulted templates re-derived for that mode."""
        return replace(self, mc_mode=mode, **{k: "" for k in self.defaulted})


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
            examples = [] if src is None else read_examples(self.spec, src, which)
            if self.spec.question_types:  # a slice of a set, e.g. its TextVQA-like label questions
                examples = [ex for ex in examples if ex.meta.get("question_type") in self.spec.question_types]
            self._splits[which] = examples
        return self._splits[which]

    @property
    def test(self) -> list[Example]:
        return self.split("test")

    @property
    def train(self) -> list[Example]:
        return self.split("train")

    def resolved(self, mc_mode: str) -> Task:
        """This task with `mc_mode` filled in where the spec left it open (examples are shared)."""
        if self.spec.kind != "mc" or self.spec.mc_mode:
            return self
        task = Task(self.spec.with_mc_mode(mc_mode))
        task._splits = self._splits
        return task


def read_examples(spec: TaskSpec, src: Any, split: str) -> list[Example]:
    fmt = FORMATS.get(spec.format or default_format(spec.kind, src))
    with read_task_files(spec.allow_outside_paths):
        return fmt.read(spec, src if isinstance(src, dict) else Path(src), split)


# ----------------------------------------------------------------------------- registry and specs

SPEC_SUFFIXES = (".yaml", ".yml", ".json")  # an eval.tasks entry ending so is a task spec file, not a name


def _task_names(cfg: Any) -> list[str]:
    return [t for t in cfg.eval.tasks if Path(t).suffix not in SPEC_SUFFIXES]


TASKS: Registry[Callable[[Path], TaskSpec]] = Registry("eval task", "eval.tasks", _task_names)


@TASKS.validates
def check_eval_options(cfg: Any) -> None:
    """The `eval.*` choices every task is run with (config load, and `evaluate` for a changed config)."""
    e = cfg.eval
    one_of("eval.vqa_mode", e.vqa_mode, ("always", "official"))
    one_of("eval.cider_tokenizer", e.cider_tokenizer, ("python", "java"))
    one_of("eval.mc_normalize", e.mc_normalize, ("none", "length"))
    one_of("eval.mc_mode", e.mc_mode, MC_MODES)
    one_of("eval.device", e.device, ("auto", "cpu", "cuda"))
    one_of("eval.dtype", e.dtype, ("auto", "fp32", "bf16"))
    check(e.trials >= 1, "eval.trials", e.trials, "must be >= 1")
    check(all(s >= 0 for s in e.shots), "eval.shots", e.shots, "shots must be >= 0")


def _world(kind: str, stem: str, name: str = "", **kw: Any) -> Callable[[Path], TaskSpec]:
    def build(world: Path) -> TaskSpec:
        ev = world / "eval"
        if kind == "vqa":
            split = {
                s: {"questions": ev / f"{stem}_{s}_questions.json", "annotations": ev / f"{stem}_{s}_annotations.json"}
                for s in ("train", "test")
            }
            return TaskSpec(name or f"world_{stem}", kind, split["test"], split["train"], image_root=ev, **kw)
        ext = "json" if kind == "caption" else "jsonl"
        return TaskSpec(
            name or f"world_{stem}", kind, ev / f"{stem}_test.{ext}", ev / f"{stem}_train.{ext}", image_root=ev, **kw
        )

    return build


TASKS.register("world_caption")(_world("caption", "caption"))
TASKS.register("world_vqa")(_world("vqa", "vqa"))
# the world's TextVQA role: questions about the printed label, legible only near the native 128 px
TASKS.register("world_vqa_label")(_world("vqa", "vqa", "world_vqa_label", question_types=["label"]))
TASKS.register("world_text")(_world("text", "text"))
TASKS.register("world_multi")(_world("multi", "multi"))
TASKS.register("world_mc")(_world("mc", "mc"))
# held-out text documents (kept out of training): the LM's text ability as perplexity, no demonstrations
TASKS.register("world_text_ppl")(
    lambda world: TaskSpec("world_text_ppl", "text", world / "eval" / "text_docs_test.jsonl", metric="perplexity")
)


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
    if not isinstance(data, dict) or not {"kind", "format"} & set(data) or "test" not in data:
        raise ConfigError(
            f"{path}: a task spec needs `test` and a `kind` ({'|'.join(KINDS)}) or a `format` "
            f"({'|'.join(FORMATS.names())})"
        )
    allowed = {f.name for f in fields(TaskSpec) if f.init}
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
    data.setdefault("kind", "")
    return TaskSpec(**data)


def get_task(name: str, world: str | Path = "data/world-tiny", allow_outside_paths: bool = False) -> Task:
    """A registered task name (world tasks read `world`), or the path of a YAML/JSON task spec.
    `allow_outside_paths` (data.allow_outside_paths) lets image names leave the task's image root."""
    p = Path(name)
    spec = load_spec(p) if p.suffix in SPEC_SUFFIXES and p.is_file() else TASKS.get(name)(Path(world))
    spec.allow_outside_paths = spec.allow_outside_paths or allow_outside_paths
    return Task(spec)
