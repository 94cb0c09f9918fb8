"""Bad input on disk, built for real: each bad sample is skipped and counted per reason, the good
ones around it survive, and too many skips stop the run with an error that says what to do."""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mm1.data.formats import open_source
from mm1.data.images import ImageError, load_image
from mm1.data.kinds.caption import write_caption_shard
from mm1.data.kinds.interleaved import write_interleaved_parquet
from mm1.data.safety import ReadPolicy
from mm1.data.skips import DataError, SkipCounter
from mm1.data.writers import write_jsonl


def png(value: int = 128, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((size, size), value).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def good(i: int) -> dict:
    return {"key": f"{i:06d}", "png": png(), "txt": f"caption {i}"}


def read_all(kind, path, **kw):
    skips = SkipCounter(**kw)
    return list(open_source(kind, path, skips)), skips


def test_truncated_image_in_a_shard_is_counted_when_a_worker_decodes_it(tmp_path):
    broken = png()[:60]  # header survives, pixel data cut
    shard = write_caption_shard(tmp_path / "s.tar", [good(0), {"key": "000001", "png": broken, "txt": "cut"}, good(2)])
    records, skips = read_all("caption", shard)
    assert len(records) == 3  # readers do not decode; the loader does, and reports failures back
    decoded = 0
    for r in records:
        try:
            load_image(r.image, r.where)
            decoded += 1
        except ImageError as e:
            skips.skip(e.reason, r.where, str(e), already_counted=True)
    assert decoded == 2 and skips.counts == {"corrupt image": 1} and skips.seen == 3
    assert skips.examples["corrupt image"].endswith("s.tar:000001")


def test_missing_image_files_in_a_manifest_are_skipped(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "a.png", "caption": "here"},
            {"image": "gone.png", "caption": "lost"},
            {"caption": "no image field"},
        ],
    )
    records, skips = read_all("caption", manifest)
    assert [r.caption for r in records] == ["here"]
    assert skips.counts == {"missing image file": 1, "missing image": 1}


def write_caption_shard_bytes(samples) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext in ("png", "txt"):
                data = s[ext] if isinstance(s[ext], bytes) else s[ext].encode()
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _offsets(raw: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return [m.offset for m in tar.getmembers()]


@pytest.mark.parametrize("cut", ["mid-member", "at-member-boundary", "mid-header"])
def test_a_truncated_tar_keeps_the_samples_before_the_cut_and_counts_the_damage(tmp_path, cut):
    raw = write_caption_shard_bytes([good(i) for i in range(4)])
    offsets = _offsets(raw)  # 8 members: png, txt per sample
    at = {"mid-member": offsets[4] + 512 + 40, "at-member-boundary": offsets[4], "mid-header": offsets[4] + 100}[cut]
    shard = tmp_path / "cut.tar"
    shard.write_bytes(raw[:at])
    records, skips = read_all("caption", shard)
    assert [r.key for r in records] == ["000000", "000001"]
    assert skips.counts.get("truncated tar") == 1, skips.counts
    assert "cut.tar" in skips.examples["truncated tar"]


def test_a_damaged_member_header_is_counted_not_silently_ending_the_shard(tmp_path):
    raw = bytearray(write_caption_shard_bytes([good(i) for i in range(4)]))
    offsets = _offsets(bytes(raw))
    raw[offsets[4] + 148 : offsets[4] + 156] = b"garbage!"  # the header checksum field
    shard = tmp_path / "bad.tar"
    shard.write_bytes(bytes(raw))
    records, skips = read_all("caption", shard)
    assert [r.key for r in records] == ["000000", "000001"]
    assert skips.counts == {"broken tar member": 2}  # the two samples after the damage, from the byte offset


def test_a_failing_pipe_source_is_counted_not_a_traceback(tmp_path):
    shard = write_caption_shard(tmp_path / "ok.tar", [good(0)])
    src = open_source(
        "caption",
        [f"pipe:cat {shard}", f"pipe:cat {tmp_path}/missing.tar 2>/dev/null"],
        SkipCounter(),
        policy=ReadPolicy(allow_commands=True),
    )
    records = [r for f in src.files for r in src.read(f)]
    assert len(records) == 1 and src.skips.counts == {"unreadable shard": 1}


def test_empty_and_non_string_captions_are_skipped(tmp_path):
    shard = write_caption_shard(
        tmp_path / "s.tar",
        [
            good(0),
            {"key": "e", "png": png(), "txt": "   \n"},
            {"key": "n", "png": png(), "txt": b"\xff\xfe bad utf8"},
            {"key": "c", "txt": "a caption, no image"},
            good(1),
        ],
    )
    (tmp_path / "a.png").write_bytes(png())
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "a.png", "caption": 123},
            {"image": "a.png", "caption": ""},
            {"image": "a.png", "caption": None},
            {"image": "a.png", "caption": "ok"},
        ],
    )
    records, skips = read_all("caption", [shard, manifest])
    assert [r.caption for r in records] == ["ok", "caption 0", "caption 1"]
    assert skips.counts == {"empty caption": 2, "undecodable caption": 1, "missing image": 1, "non-string caption": 2}


def test_malformed_interleaved_rows_are_skipped_by_reason(tmp_path):
    ok = {"texts": ["intro", None], "images": [None, png()]}
    path = write_interleaved_parquet(
        tmp_path / "d.parquet",
        [
            ok,
            {"texts": ["a", None, "b"], "images": [None, png()]},  # lengths differ
            {"texts": ["a", "b"], "images": [None, png()]},  # both at position 1
            {"texts": ["a", None], "images": [None, None]},  # neither at position 1
            {"texts": [None, None], "images": [png(), png()]},  # only images
            {"texts": ["   "], "images": [None]},  # whitespace is not text
            ok,
        ],
        row_group_size=3,
    )
    records, skips = read_all("interleaved", path)
    assert [r.where.rsplit(" ", 1)[1] for r in records] == ["0", "6"]
    assert skips.counts == {
        "texts/images length mismatch": 1,
        "not one of text/image per position": 2,
        "document without text": 2,
    }


def test_interleaved_image_paths_that_are_urls_or_missing_are_skipped(tmp_path):
    path = write_interleaved_parquet(
        tmp_path / "d.parquet",
        [
            {"texts": ["t", None], "images": [None, "https://example.com/x.jpg"]},
            {"texts": ["t", None, None], "images": [None, "missing.png", "also-missing.png"]},
        ],
        image_type="string",
    )
    records, skips = read_all("interleaved", path)
    assert records == [] and skips.counts == {"image URL (not downloaded)": 1, "missing image file": 1}


def test_malformed_json_lines_are_skipped_and_the_rest_is_read(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [{"text": "one"}, '{"text": "unterminated', "[1, 2]", {"text": 7}, {"id": 1}, {"text": "two"}],
    )
    records, skips = read_all("text", path)
    assert [r.text for r in records] == ["one", "two"]
    assert skips.counts == {"malformed json line": 2, "non-string text": 1, "missing text": 1}
    assert skips.examples["malformed json line"].endswith("t.jsonl:line 2")


def test_a_truncated_gzip_jsonl_keeps_what_was_readable(tmp_path):
    raw = gzip.compress("".join(json.dumps({"text": f"line {i} " * 20}) + "\n" for i in range(200)).encode())
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(raw[: len(raw) * 2 // 3])
    records, skips = read_all("text", path)
    assert 0 < len(records) < 200 and skips.counts == {"truncated file": 1}


def test_sft_samples_with_marker_mismatch_or_missing_images_are_skipped(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    turns = [{"from": "human", "value": "<image>\n<image>\nWhat?"}, {"from": "gpt", "value": "Cats."}]
    path = tmp_path / "sft.jsonl"
    write_jsonl(
        path,
        [
            {"id": "two-markers-one-image", "image": "a.png", "conversations": turns},
            {"id": "missing", "image": "gone.png", "conversations": turns[1:]},
            {
                "id": "marker-in-answer",
                "image": "a.png",
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<image>"}],
            },
            {"id": "no-answer", "conversations": [{"from": "human", "value": "hi"}]},
            {"id": "bad-role", "conversations": [{"from": "bot", "value": "hi"}]},
            {"id": "unhashable-role", "conversations": [{"from": ["human"], "value": "hi"}, "not a turn"]},
            "not json at all",
            {
                "id": "fine",
                "image": "a.png",
                "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A texture."}],
            },
        ],
    )
    records, skips = read_all("sft", path)
    assert [r.key for r in records] == ["fine"]
    assert skips.counts == {
        "image marker mismatch": 2,
        "missing image file": 1,
        "no assistant turn": 1,
        "malformed conversations": 2,
        "malformed json line": 1,
    }
    assert "(id missing)" in skips.examples["missing image file"]


def test_a_broken_llava_json_list_fails_with_the_position(tmp_path):
    path = tmp_path / "llava.json"
    path.write_text('[{"id": 1, "conversations": []}, {"id": 2,,}]')
    with pytest.raises(DataError, match=r"llava.json: not valid JSON .*column.*JSONL"):
        list(open_source("sft", path, SkipCounter()))


def test_a_truncated_parquet_file_fails_at_open(tmp_path):
    path = write_interleaved_parquet(tmp_path / "d.parquet", [{"texts": ["a"], "images": [None]}] * 10)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="d.parquet: not a readable parquet file.*OBELICS"):
        open_source("interleaved", path, SkipCounter())


# ----------------------------------------------------------------------------- the threshold


def test_too_many_skips_stop_with_counts_per_reason_and_the_config_key(tmp_path):
    samples = [good(i) if i % 4 else {"key": f"{i:06d}", "png": png(), "txt": ""} for i in range(40)]
    shard = write_caption_shard(tmp_path / "s.tar", samples)
    skips = SkipCounter(max_skip_rate=0.1, min_samples=20)
    src = open_source("caption", shard, skips)
    with pytest.raises(DataError) as info:
        list(src)
    msg = str(info.value)
    assert "empty caption: 5" in msg and "data.max_skip_rate=0.1" in msg and "s.tar:000000" in msg
    assert skips.seen == 20  # raised as soon as the rate could be judged, not at the end


def test_skips_below_the_threshold_or_before_min_samples_do_not_stop_a_run():
    skips = SkipCounter(max_skip_rate=0.1, min_samples=100)
    for i in range(5):
        skips.skip("corrupt image", f"s.tar:{i}")  # 100 % bad, but only 5 samples so far
    skips.ok(95)  # 5 % at 100 samples
    skips.skip("corrupt image", "s.tar:100")
    assert skips.rate < 0.1
    with pytest.raises(DataError, match="corrupt image: 11 "):
        for i in range(10):
            skips.skip("corrupt image", f"s.tar:{101 + i}")


def test_a_source_with_nothing_but_bad_samples_fails_when_exhausted():
    skips = SkipCounter(min_samples=1000)
    for i in range(3):
        skips.skip("empty caption", f"a.tar:{i}")
    with pytest.raises(DataError, match="skipped 3 of 3"):
        skips.check(final=True)


def test_skip_warnings_name_the_sample_and_are_rate_limited(caplog):
    skips = SkipCounter(max_skip_rate=1.0, log_first=3, name="caption")
    with caplog.at_level(logging.WARNING, logger="mm1.data"):
        for i in range(250):
            skips.skip("corrupt image", f"shard-7.tar:{i:06d}")
    messages = [r.getMessage() for r in caplog.records]
    assert "shard-7.tar:000000" in messages[0] and "corrupt image" in messages[0]
    # 3 one by one, one "further ..." note, then at 10 and 100 only
    assert len(messages) == 6 and "100 samples skipped" in messages[-1]


def test_skip_counts_survive_a_resume_and_merge_across_workers():
    a = SkipCounter()
    a.ok(10)
    a.skip("corrupt image", "x.tar:1")
    b = SkipCounter()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # through a JSON checkpoint
    assert (b.seen, b.counts, b.examples) == (11, {"corrupt image": 1}, {"corrupt image": "x.tar:1"})
    worker = SkipCounter()
    worker.ok(4)
    worker.skip("empty caption", "y.tar:2")
    b.merge(worker.state_dict())
    assert b.seen == 16 and b.counts == {"corrupt image": 1, "empty caption": 1}
    assert b.summary() == "data: skipped 2 of 16 samples (12.50%): corrupt image 1, empty caption 1"


def test_open_time_checks_also_reject_unknown_kinds():
    from mm1.registry import ConfigError

    with pytest.raises(ConfigError, match="captions.*unknown data kind; allowed: caption, interleaved, sft, text"):
        open_source("captions", ".", SkipCounter())


def test_parquet_with_a_corrupt_row_group_keeps_the_other_row_groups(tmp_path):
    table = pa.table({"text": pa.array([f"text {i} " * 50 for i in range(30)])})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=10, compression="none")
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(1).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start : start + 64] = b"\xff" * 64  # smash the middle row group's page header
    path.write_bytes(bytes(raw))
    records, skips = read_all("text", path)
    assert [r.text.split()[1] for r in records] == [str(i) for i in list(range(10)) + list(range(20, 30))]
    assert skips.counts == {"corrupt parquet row group": 10}  # every row it held


def test_a_bad_file_past_the_open_time_checks_is_skipped_when_read(tmp_path, monkeypatch, caplog):
    import mm1.data.formats as formats

    monkeypatch.setattr(formats, "OPEN_CHECKS", 1)
    write_interleaved_parquet(tmp_path / "a.parquet", [{"texts": ["fine"], "images": [None]}])
    pq.write_table(pa.table({"text": ["wrong layout"]}), tmp_path / "b.parquet")
    with caplog.at_level(logging.WARNING, logger="mm1.data"):
        records, skips = read_all("interleaved", tmp_path)
    assert [r.texts for r in records] == [["fine"]] and skips.counts == {"unreadable file": 1}
    assert "b.parquet" in caplog.text and "needs columns texts, images" in caplog.text


def test_a_shard_whose_trailing_padding_was_cut_is_still_whole(tmp_path):
    raw = write_caption_shard_bytes([good(i) for i in range(3)])
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + (last.size + 511) // 512 * 512  # first byte after the last member
    shard = tmp_path / "s.tar"
    shard.write_bytes(raw[: end + 512])  # keep one zero block (the end-of-archive marker)
    records, skips = read_all("caption", shard)
    assert len(records) == 3 and skips.counts == {}


def test_a_malformed_member_json_and_a_duplicate_member_are_counted(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [
            ("a.png", png()),
            ("a.txt", b"first"),
            ("a.txt", b"again"),
            ("b.png", png()),
            ("b.txt", b"b"),
            ("b.json", b'{"dense": "unterminated'),
            ("c.png", png()),
            ("c.txt", b"c"),
            ("c.json", b'{"dense": "a dense caption"}'),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    records, skips = read_all("caption", shard)
    assert [(r.key, r.caption, r.dense) for r in records] == [("a", "first", None), ("c", "c", "a dense caption")]
    assert skips.counts == {"duplicate tar member": 1, "malformed json": 1}
