"""Sequence building and packing: documents, slot runs, targets, positions, efficiency."""

from __future__ import annotations

import random
from types import SimpleNamespace as NS

import pytest
import torch

from mm1.data.kinds import get_kind
from mm1.data.sequence import Doc, DocBuilder, RowPacker, SampleError, collate, packing_efficiency
from mm1.data.tokenizer import Tokenizer

WORDS = "red green blue yellow circle square triangle star left right top bottom small large the a of is".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    return Tokenizer.train(texts, 400, tmp_path_factory.mktemp("tok"))


def fake_images(raw, where):  # an "image" is its id; the crop is filled with it so order is checkable
    return [torch.full((3, 2, 2), float(raw))]


def to_docs(b: DocBuilder, kind: str, record) -> list[Doc]:
    """The docs the registered `kind` makes of `record` with builder `b`."""
    return get_kind(kind).to_docs(b, record)


def builder(tok: Tokenizer, seq_len: int = 64, k: int = 4, max_images: int = 16, ratio: float = 0.0) -> DocBuilder:
    return DocBuilder(tok, fake_images, seq_len, max_images, k, 1, ratio, seed=0)


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def pack_all(docs: list[Doc], seq_len: int, max_images: int = 16, lookahead: int = 32) -> list[list[Doc]]:
    source, buffer, rows = iter(docs), [], []

    def refill() -> None:
        while len(buffer) < lookahead and (d := next(source, None)) is not None:
            buffer.append(d)

    packer = RowPacker(seq_len, max_images)
    refill()
    while buffer:
        rows.append(packer.fill(buffer, lambda d: d, refill))
    return rows


def test_caption_pair_is_image_slots_then_caption_then_eos(tok: Tokenizer) -> None:
    (doc,) = to_docs(builder(tok), "caption", NS(key="k0", where="w", image=7, caption="a red star", dense=None))
    assert doc.ids == [tok.image_id] * 4 + tok.encode(" a red star") + [tok.eos_id]
    assert doc.learn == [False] * 4 + [True] * (len(doc.ids) - 4)
    assert len(doc.images) == 1 and doc.images[0][0, 0, 0] == 7


def test_synthetic_caption_ratio_picks_dense_captions_deterministically_per_key(tok: Tokenizer) -> None:
    b = builder(tok, ratio=0.3)
    recs = [NS(key=f"s{i}", where="w", image=0, caption="alt", dense="dense words") for i in range(2000)]
    dense = tok.encode(" dense words")
    picks = [to_docs(b, "caption", r)[0].ids[4:-1] == dense for r in recs]
    assert abs(sum(picks) / len(picks) - 0.3) < 0.04
    again = builder(tok, ratio=0.3)  # e.g. another worker, or after a resume
    assert picks == [to_docs(again, "caption", r)[0].ids[4:-1] == dense for r in recs]  # same key, same choice
    no_dense = to_docs(b, "caption", NS(key="s1", where="w", image=0, caption="alt", dense=None))[0]
    assert no_dense.ids[4:-1] == tok.encode(" alt")


def test_caption_text_tags_trains_on_the_image_labels_and_names_a_sample_without_them(tok: Tokenizer) -> None:
    b = DocBuilder(tok, fake_images, 64, 16, 4, 1, 1.0, seed=0, caption_text="tags")
    rec = NS(key="k", where="shard-0.tar:k", image=0, caption="alt", dense="dense words", tags="circle star")
    assert to_docs(b, "caption", rec)[0].ids[4:] == tok.encode(" circle star") + [tok.eos_id]  # not alt, not dense
    with pytest.raises(SampleError, match=r"shard-0.tar:k: data.caption_text=tags needs .*'tags'") as e:
        to_docs(b, "caption", NS(key="k", where="shard-0.tar:k", image=0, caption="alt", dense=None, tags=None))
    assert e.value.reason == "missing tags"


def test_caption_packing_fills_at_least_95_percent_of_the_tokens(tok: Tokenizer) -> None:
    rng = random.Random(1)
    b = builder(tok, seq_len=256, k=16, ratio=0.5)
    recs = [
        NS(key=f"c{i}", where="w", image=i, caption=sentence(rng, 2, 6), dense=sentence(rng, 12, 30))
        for i in range(600)
    ]
    docs = [d for r in recs for d in to_docs(b, "caption", r)]
    rows = pack_all(docs, 256)
    batch = collate(rows, 256, tok.pad_id, tok.image_id, [0] * len(rows))
    assert sorted(d.key for row in rows for d in row) == sorted(r.key for r in recs)  # nothing lost
    assert packing_efficiency(batch) >= 0.95, packing_efficiency(batch)


def test_packed_rows_restart_positions_and_number_documents(tok: Tokenizer) -> None:
    b = builder(tok, seq_len=40)
    pairs = [NS(key=f"c{i}", where="w", image=i, caption="a red star", dense=None) for i in range(3)]
    docs = [d for r in pairs for d in to_docs(b, "caption", r)]
    batch = collate([docs], 40, tok.pad_id, tok.image_id, [0])
    n = len(docs[0])
    assert batch["position_ids"][0, :n].tolist() == list(range(n))
    assert batch["position_ids"][0, n : 2 * n].tolist() == list(range(n))
    assert batch["doc_ids"][0, : 3 * n].tolist() == [0] * n + [1] * n + [2] * n
    assert (batch["doc_ids"][0, 3 * n :] == -1).all() and (batch["input_ids"][0, 3 * n :] == tok.pad_id).all()
    assert torch.equal(batch["images"][:, 0, 0, 0], torch.tensor([0.0, 1.0, 2.0]))  # order of appearance


def test_targets_are_shifted_and_ignore_slots_padding_and_document_ends(tok: Tokenizer) -> None:
    b = builder(tok, seq_len=40)
    pairs = [NS(key=f"c{i}", where="w", image=i, caption="blue circle", dense=None) for i in range(2)]
    docs = [d for r in pairs for d in to_docs(b, "caption", r)]
    batch = collate([docs], 40, tok.pad_id, tok.image_id, [0])
    ids, tgt, n = batch["input_ids"][0], batch["targets"][0], len(docs[0])
    for t in range(40):
        same_doc = t + 1 < 40 and batch["doc_ids"][0, t] >= 0 and batch["doc_ids"][0, t] == batch["doc_ids"][0, t + 1]
        expect = int(ids[t + 1]) if same_doc and ids[t + 1] != tok.image_id else -100
        assert int(tgt[t]) == expect, t
    assert int(tgt[3]) == ids[4] != -100  # the last slot predicts the caption's first token
    assert int(tgt[n - 1]) == -100  # end of document: the next document is not predicted


def test_interleaved_documents_are_cut_between_slot_runs_only(tok: Tokenizer) -> None:
    rng = random.Random(2)
    b = builder(tok, seq_len=48, k=8, max_images=3)
    texts, images = [], []
    for i in range(30):  # images never last nor adjacent here, so every piece has text to learn
        if 0 < i < 29 and images and images[-1] is None and rng.random() < 0.5:
            texts.append(None)
            images.append(i)
        else:
            texts.append(sentence(rng, 1, 9))
            images.append(None)
    rec = NS(key="doc", where="w", texts=texts, images=images)
    docs = to_docs(b, "interleaved", rec)
    assert len(docs) > 2
    shown = []
    for d in docs:
        assert len(d) <= 48 and len(d.images) <= 3
        slots = [t for t, x in enumerate(d.ids) if x == tok.image_id]
        assert len(slots) == 8 * len(d.images)
        runs = [s for s in slots if s == 0 or d.ids[s - 1] != tok.image_id]
        for s in runs:  # every run in a piece is whole (adjacent images make runs of 16, 24...)
            run = 0
            while s + run < len(d) and d.ids[s + run] == tok.image_id:
                run += 1
            assert run % 8 == 0
        shown += [int(x[0, 0, 0]) for x in d.images]
    assert shown == [i for i in images if i is not None]  # all of them, in document order
    (whole,) = to_docs(builder(tok, seq_len=10_000, k=8, max_images=100), "interleaved", rec)
    assert [x for d in docs for x in d.ids] == whole.ids  # cutting loses nothing here


def test_rows_never_hold_more_than_max_images(tok: Tokenizer) -> None:
    b = builder(tok, seq_len=256, k=2, max_images=3)
    pairs = [NS(key=f"c{i}", where="w", image=i, caption="red", dense=None) for i in range(50)]
    docs = [d for r in pairs for d in to_docs(b, "caption", r)]
    rows = pack_all(docs, 256, max_images=3)
    assert all(sum(len(d.images) for d in row) <= 3 for row in rows)
    assert sum(len(row) for row in rows) == 50


def test_text_longer_than_a_row_becomes_several_documents(tok: Tokenizer) -> None:
    text = " ".join(WORDS * 10)
    docs = to_docs(builder(tok, seq_len=32), "text", NS(key="t", where="w", text=text))
    assert all(len(d) <= 32 for d in docs)
    assert [i for d in docs for i in d.ids] == tok.encode(text) + [tok.eos_id]


def test_sft_targets_cover_only_assistant_turns(tok: Tokenizer) -> None:
    b = builder(tok, seq_len=128)
    conv = [
        {"from": "human", "value": "<image>\nwhat colour?"},
        {"from": "gpt", "value": "blue"},
        {"from": "human", "value": "shape?"},
        {"from": "gpt", "value": "a square"},
    ]
    (doc,) = to_docs(b, "sft", NS(key="q", where="w", images=[5], conversations=conv))
    batch = collate([[doc]], 128, tok.pad_id, tok.image_id, [3])
    learned = batch["targets"][0][batch["targets"][0] != -100].tolist()
    assert learned == tok.encode(" blue") + [tok.im_end_id] + tok.encode(" a square") + [tok.im_end_id]
    assert batch["images"].shape[0] == 1


def test_sft_without_image_marker_puts_the_image_first_and_mismatch_is_skipped(tok: Tokenizer) -> None:
    b = builder(tok, seq_len=128)
    (doc,) = to_docs(
        b,
        "sft",
        NS(
            key="q",
            where="w",
            images=[1],
            conversations=[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}],
        ),
    )
    assert doc.ids.count(tok.image_id) == 4
    with pytest.raises(SampleError) as err:
        conv = [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "red"}]
        to_docs(b, "sft", NS(key="q", where="f.json:3", images=[1], conversations=conv))
    assert err.value.reason == "image_count_mismatch" and "f.json:3" in str(err.value)


def test_literal_image_marker_in_raw_text_does_not_create_slots(tok: Tokenizer) -> None:
    (doc,) = to_docs(builder(tok), "text", NS(key="t", where="w", text="html says <image> here"))
    assert tok.image_id not in doc.ids


def test_text_and_interleaved_rows_are_topped_up_by_splitting_the_oldest_doc(tok: Tokenizer) -> None:
    rng = random.Random(3)
    b = builder(tok, seq_len=256, k=8)
    recs = [
        NS(key=f"d{i}", where="w", texts=[sentence(rng, 3, 40), None, sentence(rng, 3, 60)], images=[None, i, None])
        for i in range(40)
    ]
    docs = [d for r in recs for d in to_docs(b, "interleaved", r)]
    source, buffer, rows = iter(docs), [], []

    def refill() -> None:
        while len(buffer) < 4 and (d := next(source, None)) is not None:
            buffer.append(d)

    def split(doc: Doc, max_tokens: int, max_crops: int):
        end = b.prefix_end(doc, 0, max_tokens, max_crops)
        head, tail = b.slice(doc, 0, end), b.slice(doc, end)
        return (head, tail) if any(head.learn[1:]) and any(tail.learn[1:]) else None

    packer = RowPacker(256, 16)
    refill()
    while buffer:
        rows.append(packer.fill(buffer, lambda d: d, refill, split))
    batch = collate(rows, 256, tok.pad_id, tok.image_id, [1] * len(rows))
    full = collate(rows[:-1], 256, tok.pad_id, tok.image_id, [1] * (len(rows) - 1))  # the last row is the rest
    assert packing_efficiency(full) > 0.95
    originals = {id(d) for d in docs}
    assert sum(id(d) not in originals for row in rows for d in row) >= 4  # heads and tails of splits
    pieces: dict[str, list[int]] = {}
    for row in rows:
        for d in row:
            pieces.setdefault(d.key, []).extend(d.ids)
            assert d.ids.count(tok.image_id) == 8 * len(d.images)  # a split never lands inside a slot run
    assert all(pieces[d.key] == d.ids for d in docs)  # head + tail = the document, in order
    assert sorted(int(x[0, 0, 0]) for x in batch["images"]) == list(range(40))  # none lost or doubled
