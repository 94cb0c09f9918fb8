"""Readers for well-formed data: every kind, every way of naming files, resume by record."""

from __future__ import annotations

import io
import json
import os
import shlex

import numpy as np
import pytest
from PIL import Image

from mm1.data.formats import open_source, resolve_files
from mm1.data.images import load_image
from mm1.data.kinds.caption import CaptionRecord, write_caption_shard
from mm1.data.kinds.interleaved import InterleavedRecord, write_interleaved_parquet
from mm1.data.kinds.sft import SFTRecord
from mm1.data.kinds.text import TextRecord, write_text_parquet
from mm1.data.safety import ReadPolicy
from mm1.data.skips import DataError, DataFileNotFoundError, SkipCounter
from mm1.data.writers import write_jsonl


def png(value: int, size: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def caption_samples(shard: int, n: int = 3) -> list[dict]:
    return [
        {
            "key": f"{shard:03d}{i:03d}",
            "png": png(10 * i + shard),
            "txt": f"  a grey square {shard}-{i}\n",
            "json": {"alt": f"a grey square {shard}-{i}", "dense": f"a {4}x{4} grey square, shade {10 * i + shard}"},
        }
        for i in range(n)
    ]


@pytest.fixture
def caption_dir(tmp_path):
    d = tmp_path / "caption"
    for s in (1, 0):  # written out of order: files must come back sorted
        write_caption_shard(d / f"shard-{s:05d}.tar", caption_samples(s))
    (d / "shard-00000.parquet").write_bytes(b"img2dataset writes these next to the tars")
    (d / "shard-00000_stats.json").write_text("{}")
    return d


def test_caption_tar_shards_read_in_img2dataset_layout(caption_dir):
    skips = SkipCounter()
    src = open_source("caption", caption_dir, skips)
    assert [os.path.basename(f) for f in src.files] == ["shard-00000.tar", "shard-00001.tar"]
    records = list(src)
    assert len(records) == 6 and all(isinstance(r, CaptionRecord) for r in records)
    first = records[0]
    assert first.key == "000000" and first.caption == "a grey square 0-0"  # stripped
    assert first.dense == "a 4x4 grey square, shade 0"
    assert first.where.endswith("shard-00000.tar:000000")
    assert np.asarray(load_image(records[4].image, records[4].where))[0, 0, 0] == 11
    assert skips.seen == 6 and skips.skipped == 0


def test_caption_without_json_has_no_dense_caption_and_json_alone_can_carry_the_caption(tmp_path):
    shard = write_caption_shard(
        tmp_path / "a.tar",
        [
            {"key": "k1", "jpg": png(1), "txt": "only text"},
            {"key": "k2", "webp": png(2), "json": {"caption": "from the json"}},
        ],
    )
    records = list(open_source("caption", shard, SkipCounter()))
    assert [(r.key, r.caption, r.dense) for r in records] == [("k1", "only text", None), ("k2", "from the json", None)]


def test_caption_tags_are_read_from_the_json_or_the_manifest_and_malformed_ones_read_as_none(tmp_path):
    shard = write_caption_shard(
        tmp_path / "a.tar",
        [
            {"key": "k1", "png": png(1), "txt": "x", "json": {"tags": ["circle", " star ", ""]}},
            {"key": "k2", "png": png(2), "txt": "y", "json": {"tags": "circle"}},  # not a list
            {"key": "k3", "png": png(3), "txt": "z"},
        ],
    )
    assert [r.tags for r in open_source("caption", shard, SkipCounter())] == ["circle star", None, None]
    (tmp_path / "a.png").write_bytes(png(4))
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "c", "tags": ["heart"]}])
    assert [r.tags for r in open_source("caption", manifest, SkipCounter())] == ["heart"]


def test_globs_brace_patterns_lists_and_pipes_name_the_same_shards(caption_dir):
    every = resolve_files("caption", caption_dir)
    assert resolve_files("caption", str(caption_dir / "shard-*.tar")) == every
    assert resolve_files("caption", str(caption_dir / "shard-{00000..00001}.tar")) == every
    assert resolve_files("caption", [every[1], every[0], every[1]]) == every  # sorted, de-duplicated
    assert resolve_files("caption", "file://" + str(caption_dir)) == every
    pipe = "pipe:cat " + shlex.quote(every[1])
    src = open_source("caption", pipe, SkipCounter(), policy=ReadPolicy(allow_commands=True))
    assert src.files == [pipe]
    assert [r.caption for r in src] == [f"a grey square 1-{i}" for i in range(3)]


def test_caption_jsonl_manifest_resolves_image_paths_relative_to_itself(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png(200))
    manifest = write_jsonl(tmp_path / "pairs.jsonl", [{"image": "imgs/a.png", "caption": "a light square"}])
    (rec,) = list(open_source("caption", manifest, SkipCounter()))
    assert rec.image == str(tmp_path / "imgs" / "a.png") and rec.caption == "a light square"
    assert rec.where == f"{manifest}:line 1"


def test_interleaved_parquet_is_read_row_group_by_row_group_in_order(tmp_path):
    (tmp_path / "img.png").write_bytes(png(9))
    docs = [{"id": f"doc{i}", "texts": [f"text {i}", None, "after"], "images": [None, png(i), None]} for i in range(5)]
    write_interleaved_parquet(tmp_path / "a.parquet", docs, row_group_size=2)
    write_interleaved_parquet(
        tmp_path / "b.parquet", [{"texts": [None, "a path image"], "images": ["img.png", None]}], image_type="string"
    )
    src = open_source("interleaved", tmp_path, SkipCounter())
    records = list(src)
    assert all(isinstance(r, InterleavedRecord) for r in records)
    assert [r.key for r in records[:5]] == [f"doc{i}" for i in range(5)]
    assert records[3].texts == ["text 3", None, "after"] and records[3].images[1] == png(3)
    assert records[3].where.endswith("a.parquet:row 3")
    assert records[5].images == [str(tmp_path / "img.png"), None] and records[5].key == "b-0"


def test_text_from_jsonl_and_parquet(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": "hello"}, {"text": "world"}])
    write_text_parquet(tmp_path / "b.parquet", ["from parquet"])
    records = list(open_source("text", tmp_path, SkipCounter()))
    assert [(r.key, r.text) for r in records] == [("x", "hello"), ("a-2", "world"), ("b-0", "from parquet")]
    assert all(isinstance(r, TextRecord) for r in records)


def test_sft_llava_json_inserts_the_missing_image_marker_and_keeps_explicit_ones(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "images" / name).write_bytes(png(5))
    samples = [
        {
            "id": "one",
            "image": "images/a.png",
            "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A square."}],
        },
        {
            "id": "two",
            "image": ["images/a.png", "images/b.png"],
            "conversations": [
                {"from": "user", "value": "<image>\nvs <image>\nSame?"},
                {"from": "assistant", "value": "Yes."},
            ],
        },
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(samples))
    records = list(open_source("sft", path, SkipCounter()))
    assert all(isinstance(r, SFTRecord) for r in records) and [r.key for r in records] == ["one", "two", "text-only"]
    assert records[0].conversations[0]["value"] == "<image>\nWhat is it?"
    assert samples[0]["conversations"][0]["value"] == "What is it?"  # the input is not mutated
    assert records[0].images == [str(tmp_path / "images" / "a.png")]
    assert [c["from"] for c in records[1].conversations] == ["human", "gpt"]
    assert records[1].conversations[0]["value"].count("<image>") == 2 and len(records[1].images) == 2
    assert records[2].images == []
    jsonl = write_jsonl(tmp_path / "train.jsonl", samples)
    assert [r.conversations for r in open_source("sft", jsonl, SkipCounter())] == [r.conversations for r in records]


def test_sft_image_root_overrides_the_json_directory(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "1.png").write_bytes(png(1))
    (tmp_path / "ann").mkdir()
    path = tmp_path / "ann" / "llava.json"
    path.write_text(
        json.dumps(
            [
                {
                    "id": 1,
                    "image": "1.png",
                    "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "one"}],
                }
            ]
        )
    )
    (rec,) = list(open_source("sft", path, SkipCounter(), image_root=str(tmp_path / "coco")))
    assert rec.images == [str(tmp_path / "coco" / "1.png")] and rec.key == "1"


def test_reading_from_a_record_offset_resumes_without_recounting_skips(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, "{broken", {"text": "b"}, {"text": ""}, {"text": "c"}])
    skips = SkipCounter()
    src = open_source("text", path, skips)
    assert [r.text for r in src.read(str(path))] == ["a", "b", "c"]
    state = skips.state_dict()
    assert state["seen"] == 5 and sum(state["counts"].values()) == 2
    resumed = SkipCounter()
    resumed.load_state_dict({"seen": 3, "counts": {"malformed json line": 1}})  # as saved after "a", "b"
    src2 = open_source("text", path, resumed)
    assert [r.text for r in src2.read(str(path), start=2)] == ["c"]
    assert resumed.state_dict()["seen"] == 5 and resumed.counts == {"malformed json line": 1, "empty text": 1}


# ----------------------------------------------------------------------------- open-time errors


def test_a_missing_path_fails_at_open_with_the_path_and_the_expected_layout(tmp_path):
    with pytest.raises(DataFileNotFoundError) as info:
        open_source("caption", tmp_path / "nowhere", SkipCounter())
    assert str(tmp_path / "nowhere") in str(info.value) and "img2dataset" in str(info.value)
    with pytest.raises(FileNotFoundError, match="placeholder was not substituted"):
        open_source("text", "{world}/text", SkipCounter())
    with pytest.raises(DataFileNotFoundError, match="matches no files"):
        open_source("interleaved", str(tmp_path / "*.parquet"), SkipCounter())


def test_a_directory_without_the_expected_files_lists_what_it_has(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataFileNotFoundError, match=r"no \.parquet files.*notes\.txt.*OBELICS"):
        open_source("interleaved", tmp_path, SkipCounter())


def test_unreadable_formats_fail_at_open_naming_file_and_layout(tmp_path):
    bad_tar = tmp_path / "fake.tar"
    bad_tar.write_text("this is not a tar archive at all" * 40)
    with pytest.raises(DataError, match="fake.tar: not a tar archive"):
        open_source("caption", bad_tar, SkipCounter())
    texts_only = write_text_parquet(tmp_path / "p.parquet", ["a"])
    with pytest.raises(DataError, match=r"no column texts, images \(it has: text\)"):
        open_source("interleaved", texts_only, SkipCounter())
    listing = tmp_path / "t.jsonl"
    listing.write_text(json.dumps([{"text": "a"}]))
    with pytest.raises(DataError, match="found a JSON list, expected one JSON object per line"):
        open_source("text", listing, SkipCounter())
    with pytest.raises(DataError, match="cannot read '.csv'"):
        (tmp_path / "t.csv").write_text("text\na\n")
        open_source("text", tmp_path / "t.csv", SkipCounter())
    with pytest.raises(DataError, match="only"):
        open_source("text", "https://example.com/t.jsonl", SkipCounter())
