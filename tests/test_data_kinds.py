"""Data kinds are registered components: a new kind is one class and one registration, and the
mixture, the config and the trainer take it like a built-in one."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mm1.config import load_config
from mm1.data.kinds import KINDS, DataKind, ReadContext
from mm1.data.readers import local_image
from mm1.data.sequence import Doc, DocBuilder, SampleError, plain_text
from mm1.data.skips import Tally
from mm1.data.tokenizer import Tokenizer
from mm1.registry import ConfigError
from mm1.train.metrics import read_metrics
from mm1.train.trainer import train


@dataclass
class QARecord:
    key: str
    where: str
    image: bytes | str
    question: str
    answer: str


@KINDS.register("toy_qa")
class ToyQA(DataKind):
    """Tab-separated `image<TAB>question<TAB>answer` lines; loss on the answer only."""

    layout = "TSV files of image path <TAB> question <TAB> answer lines (paths relative to the file)"
    suffixes = ((".tsv",),)
    lookahead = 4

    def check_file(self, file: str, suffix: str) -> None:
        pass  # any text file can be read line by line; bad lines are counted as skips

    def read(self, file: str, t: Tally, ctx: ReadContext) -> Iterator[QARecord]:
        base = os.path.dirname(os.path.abspath(file))
        with open(file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                where = f"{file}:line {n}"
                cells = line.rstrip("\n").split("\t")
                if len(cells) != 3:
                    t.skip("not three columns", where)
                    continue
                image = local_image(cells[0], base, where, t, ctx.policy)
                if image is not None:
                    t.ok()
                    yield QARecord(f"qa-{n}", where, image, cells[1], cells[2])

    def to_docs(self, b: DocBuilder, rec: Any) -> list[Doc]:
        prompt = b.tokenizer.encode(plain_text(f" Question: {rec.question} Answer:"))
        answer = b.tokenizer.encode(plain_text(f" {rec.answer}")) + [b.tokenizer.eos_id]
        if len(answer) < 2:
            raise SampleError("empty_answer", rec.where, "the answer is empty")
        ids = b.slot_run() + prompt + answer
        learn = [False] * (b.tokens_per_image + len(prompt)) + [True] * len(answer)
        return [Doc(ids, learn, b.crops(rec.image, rec.where), rec.key)]


COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    (root / "qa").mkdir()
    lines = []
    for i in range(12):
        colour = COLOURS[i % 4]
        buf = io.BytesIO()
        Image.new("RGB", (24, 24), colour).save(buf, "PNG")
        (root / "qa" / f"{i}.png").write_bytes(buf.getvalue())
        lines.append(f"{i}.png\twhat colour is it?\t{colour}")
    (root / "qa" / "train.tsv").write_text("\n".join(lines + ["a line without tabs"]) + "\n", encoding="utf-8")
    Tokenizer.train([f"Question: what colour is it? Answer: {c}" for c in COLOURS] * 10, 300, root / "tok.json")
    return root


def toy_config(root: Path, *extra: str):
    return load_config(
        "configs/tiny.yaml",
        [
            f"data.world={root / 'no-world'}",
            f"data.tokenizer={root / 'tok.json'}",
            "data.sources.caption.weight=0",
            "data.sources.interleaved.weight=0",
            "data.sources.text.weight=0",
            "data.sources.qa.kind=toy_qa",
            f"data.sources.qa.path={root / 'qa'}",
            "data.sources.qa.weight=1",
            "model.lm.n_layers=1",
            "model.vision.depth=1",
            "data.seq_len=128",
            "data.batch_size=2",
            "train.steps=2",
            "train.warmup_steps=1",
            *extra,
        ],
    )


def test_a_kind_registered_in_a_test_module_trains_two_steps(toy_data: Path, tmp_path: Path) -> None:
    cfg = toy_config(toy_data)
    train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss_toy_qa"] > 0 and r["loss_toy_qa"] == pytest.approx(r["lm_loss"]) for r in rows)
    assert not (toy_data / "no-world").exists()  # every path was real


def test_the_config_names_the_registered_kinds(toy_data: Path) -> None:
    allowed = "must be one of caption, interleaved, sft, text, toy_qa"
    with pytest.raises(ConfigError, match=rf"data.sources.qa.kind.*{allowed}"):
        toy_config(toy_data, "data.sources.qa.kind=toy_qaa")
