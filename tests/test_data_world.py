"""The synthetic world: it builds byte-identically per seed, in formats that standard tools
(tarfile, webdataset, pyarrow, json) read without mm1, with a clean train/test split."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFont

from mm1.data.skips import DataError
from mm1.data.world import build as world_build
from mm1.data.world import build_world, ensure_world
from mm1.data.world.build import TINY
from mm1.data.world.lexicon import make_lexicon
from mm1.data.world.questions import QUESTION_TYPES
from mm1.data.world.scenes import COLOURS, POSITIONS, Obj, Scene, render, sample_scene

MINI = replace(TINY.scaled(0.04, "mini"), per_shard=40, per_part=10, lexicon=16)


@pytest.fixture(scope="module")
def mini_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mini") / "w"
    build_world(out, MINI, seed=3, workers=1, verbose=False)
    return out


def checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


# ----------------------------------------------------------------------------- build


def test_tiny_world_has_the_documented_counts(tiny_world: Path) -> None:
    m = json.loads((tiny_world / "world.json").read_text())
    assert (m["size"], m["seed"]) == ("tiny", 0)
    c = m["counts"]
    assert (c["caption"], c["interleaved"], c["text_train"], c["sft"]) == (3000, 600, 1500, 6000)
    assert c["eval_images_test"] == c["eval_images_train"] == 200
    assert set(m["bytes"]) == {"caption", "interleaved", "text", "sft", "eval", "tokenizer.json"}


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(mini_world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_world(again, MINI, seed=3, workers=2, verbose=False)
    a, b = checksums(mini_world), checksums(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    other = tmp_path / "other"
    build_world(other, MINI, seed=4, workers=1, verbose=False)
    c = checksums(other)
    assert c["text/train.jsonl"] != a["text/train.jsonl"]
    assert c["caption/shard-000000.tar"] != a["caption/shard-000000.tar"]


def test_building_over_an_existing_world_needs_overwrite(mini_world: Path) -> None:
    with pytest.raises(FileExistsError, match="overwrite"):
        build_world(mini_world, MINI, seed=3, verbose=False)


def test_ensure_world_builds_once_and_rejects_a_world_of_another_seed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(world_build.WORLD_SIZES, "tiny", replace(MINI, name="tiny"))
    cfg = SimpleNamespace(world=str(tmp_path / "w"), world_preset="tiny", world_seed=5)
    path = ensure_world(cfg, verbose=False)
    assert (path / "world.json").is_file() and (path / "tokenizer.json").is_file()
    stamp = (path / "world.json").stat().st_mtime_ns
    assert ensure_world(cfg, verbose=False) == path and (path / "world.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="world_seed=6"):  # one line from the CLI, no traceback
        ensure_world(SimpleNamespace(world=str(path), world_preset="tiny", world_seed=6))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("not a world")
    with pytest.raises(FileNotFoundError, match="no world.json"):
        ensure_world(SimpleNamespace(world=str(tmp_path / "junk"), world_preset="tiny", world_seed=0))


def test_cli_world_command_writes_a_world(tmp_path: Path, monkeypatch, capsys) -> None:
    from mm1.cli import main

    monkeypatch.setitem(world_build.WORLD_SIZES, "tiny", replace(MINI, name="tiny"))
    assert main(["world", str(tmp_path / "cli"), "--seed", "1", "--workers", "1"]) == 0
    assert "caption" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "world.json").read_text())["seed"] == 1
    assert main(["world", str(tmp_path / "cli")]) == 1  # exists, no --force


# ----------------------------------------------------------------------------- formats


def test_caption_shards_read_with_tarfile_and_webdataset(tiny_world: Path) -> None:
    import webdataset as wds

    shards = sorted((tiny_world / "caption").glob("shard-*.tar"))
    assert len(shards) == 3
    with tarfile.open(shards[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000000000.png", "000000000.txt", "000000000.json"]
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "")}
    samples = list(wds.WebDataset(str(shards[0]), shardshuffle=False).decode("pil").to_tuple("png", "txt", "json"))
    assert len(samples) == 1000
    img, alt, meta = samples[7]
    assert img.size == (128, 128) and img.mode == "RGB"
    assert alt == meta["alt"] and meta["dense"].endswith(".") and len(meta["dense"]) > len(alt)
    assert 1 <= len(meta["scene"]["objects"]) <= 5
    numbers = ("one", "two", "three", "four", "five")
    backgrounds = {"plain": "plain", "gradient": "gradient", "noise": "mottled", "stripes": "striped"}
    for _, _, meta in samples[:200]:  # image-level labels: shapes, colours, place words, the count, background
        objects = meta["scene"]["objects"]
        shapes, colours = sorted({o["shape"] for o in objects}), sorted({o["colour"] for o in objects})
        places = sorted({w for o in objects for w in o["position"].split()})
        background = backgrounds[meta["scene"]["background"]]
        assert meta["tags"] == [*shapes, *colours, *places, numbers[len(objects) - 1], background]


def test_interleaved_parquet_has_one_non_null_per_position_and_2_to_10_images(tiny_world: Path) -> None:
    parts = sorted((tiny_world / "interleaved").glob("part-*.parquet"))
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    assert len(rows) == 600 and pq.read_schema(parts[0]).names == ["id", "texts", "images"]
    for r in rows:
        assert len(r["texts"]) == len(r["images"])
        assert all((t is None) != (i is None) for t, i in zip(r["texts"], r["images"])), r["id"]
        assert 2 <= sum(i is not None for i in r["images"]) <= 10
    first = next(i for i in rows[0]["images"] if i is not None)
    assert Image.open(io.BytesIO(first)).size == (128, 128)
    texts = " ".join(t for r in rows for t in r["texts"] if t)
    assert "Short answer:" in texts and "The first image has" in texts and "A short description:" in texts


def _caption_style(text: str) -> str:
    if re.match(r"(One|Two|Three|Four|Five|Six) shapes? on ", text):
        return "dense"
    return "reference" if text.endswith(".") else "alt"


def test_an_interleaved_document_captions_every_image_in_one_style_and_all_styles_occur() -> None:
    """Demonstrations can only teach a style 0-shot prompts leave open: a document keeps one, the
    references' style is one of several."""
    from mm1.data.world.documents import interleaved_document
    from mm1.data.world.language import CAPTION_STYLES, caption_in_style

    rng = np.random.default_rng(0)
    styles = []
    for _ in range(400):
        texts = [p for p in interleaved_document(rng) if isinstance(p, str)]
        captions = [m.group(1) for t in texts if (m := re.match(r"(?:A short description|Caption): (.*)\n$", t))]
        if len(captions) >= 2:
            kinds = {_caption_style(c) for c in captions}
            assert len(kinds) == 1, captions
            styles.append(kinds.pop())
    shares = {k: styles.count(k) / len(styles) for k in CAPTION_STYLES}
    assert len(styles) > 30 and all(abs(shares[k] - w) < 0.2 for k, w in CAPTION_STYLES.items()), shares
    with pytest.raises(ValueError, match="unknown caption style 'coco'"):
        caption_in_style(sample_scene(rng), "coco", rng)


def test_coco_and_vqa_eval_files_follow_the_official_schemas(tiny_world: Path) -> None:
    ev = tiny_world / "eval"
    for split in ("train", "test"):
        coco = json.loads((ev / f"caption_{split}.json").read_text())
        refs: dict[int, list[str]] = {}
        for a in coco["annotations"]:
            refs.setdefault(a["image_id"], []).append(a["caption"])
        assert len(coco["images"]) == 200 and all(len(refs[i["id"]]) == 5 for i in coco["images"])
        assert all(len(set(r)) >= 4 for r in refs.values())  # five references, varied in wording
        assert all((ev / i["file_name"]).is_file() for i in coco["images"])
        qs = json.loads((ev / f"vqa_{split}_questions.json").read_text())["questions"]
        anns = json.loads((ev / f"vqa_{split}_annotations.json").read_text())["annotations"]
        assert [q["question_id"] for q in qs] == [a["question_id"] for a in anns]
        assert all(len(a["answers"]) == 10 for a in anns)
        assert all([x["answer_id"] for x in a["answers"]] == list(range(1, 11)) for a in anns)
        assert {a["question_type"] for a in anns} == set(QUESTION_TYPES)
        assert sum(a["question_type"] == "label" for a in anns) >= 30
        variants = {x["answer"] for a in anns for x in a["answers"]}
        assert {"2", "two"} <= variants and any(v.endswith(".") for v in variants)


def normalise(answer: str) -> str:
    words = re.sub(r"[^\w\s]", "", answer.lower()).split()
    digits = {w: str(i) for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six"])}
    return " ".join(digits.get(w, w) for w in words if w not in ("a", "an", "the"))


def test_vqa_annotators_mostly_agree_with_the_canonical_answer(tiny_world: Path) -> None:
    anns = json.loads((tiny_world / "eval" / "vqa_test_annotations.json").read_text())["annotations"]
    agree = [sum(normalise(x["answer"]) == a["multiple_choice_answer"] for x in a["answers"]) for a in anns]
    assert min(agree) >= 4 and np.mean(agree) > 8.5  # >= 3 matches: the canonical answer scores 100 %
    assert np.mean([n < 10 for n in agree]) > 0.2  # real disagreement exists


def test_mc_multi_and_text_tasks_are_well_formed(tiny_world: Path) -> None:
    ev = tiny_world / "eval"
    mc = [json.loads(line) for line in (ev / "mc_test.jsonl").read_text().splitlines()]
    assert len(mc) == 200 and all(
        0 <= r["answer"] < len(r["options"]) and len(set(r["options"])) == len(r["options"]) for r in mc
    )
    multi = [json.loads(line) for line in (ev / "multi_test.jsonl").read_text().splitlines()]
    assert len(multi) == 100 and all(len(r["images"]) == 2 and (ev / r["images"][1]).is_file() for r in multi)
    assert {r["answer"] for r in multi if r["question_type"] == "more"} == {"first", "second"}
    text_qa = [json.loads(line) for line in (ev / "text_test.jsonl").read_text().splitlines()]
    assert len(text_qa) == 200 and len({r["question"] for r in text_qa}) == 200


def test_sft_json_is_llava_format_with_existing_images(tiny_world: Path) -> None:
    sft = tiny_world / "sft"
    records = json.loads((sft / "train.json").read_text())
    assert len(records) == 6000
    kinds = {"multi_image": 0, "multi_turn": 0}
    for r in records:
        paths = r["image"] if isinstance(r["image"], list) else [r["image"]]
        assert all((sft / p).is_file() for p in paths)
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].count("<image>") == len(paths)
        assert all("<image>" not in t["value"] for t in conv[1:])
        kinds["multi_image"] += len(paths) > 1
        kinds["multi_turn"] += len(conv) > 2
    assert min(kinds.values()) > 50


def test_tokenizer_reserves_special_ids_and_fits_the_world_text(tiny_world: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(tiny_world / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>")] == list(
        range(6)
    )
    text = json.loads((tiny_world / "text" / "train.jsonl").read_text().splitlines()[0])["text"]
    assert len(tok.encode(text).ids) < len(text.encode()) / 3  # trained on this text: it compresses well
    assert 1000 < tok.get_vocab_size() <= 2048


# ----------------------------------------------------------------------------- content


def _training_image_hashes(root: Path) -> set[str]:
    hashes = set()
    for shard in (root / "caption").glob("*.tar"):
        with tarfile.open(shard) as tar:
            hashes |= {sha1(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".png")}
    for part in (root / "interleaved").glob("*.parquet"):
        hashes |= {sha1(i) for r in pq.read_table(part).column("images").to_pylist() for i in r if i is not None}
    hashes |= {sha1(p.read_bytes()) for p in (root / "sft" / "images").glob("*.png")}
    hashes |= {sha1(p.read_bytes()) for p in (root / "eval" / "images").glob("*train_*.png")}
    return hashes


def test_eval_test_images_never_appear_in_any_training_split(tiny_world: Path) -> None:
    test = {sha1(p.read_bytes()) for p in (tiny_world / "eval" / "images").glob("*test_*.png")}
    assert len(test) == 200 + 2 * 100
    train = _training_image_hashes(tiny_world)
    assert len(train) > 3000 + 600 * 2 + 6000
    assert test.isdisjoint(train)


def test_an_image_equal_to_a_test_image_is_drawn_again() -> None:
    from mm1.data.world import items

    first = items.caption_item(0, 5, 64, frozenset())
    again = items.caption_item(0, 5, 64, frozenset({items.digest(first["png"])}))
    assert first["png"] != again["png"] and first["dense"] != again["dense"]


def test_invented_names_are_taught_only_by_text_documents(mini_world: Path) -> None:
    lexicon = make_lexicon(3, MINI.lexicon)
    assert [p.name for p in (mini_world / "text").iterdir()] == ["train.jsonl"]  # held-out docs live in eval/
    text = (mini_world / "text" / "train.jsonl").read_text()
    assert all(re.search(rf"\b{c.name}\b", text) for c in lexicon)
    elsewhere = (mini_world / "sft" / "train.json").read_text() + " ".join(
        t
        for p in (mini_world / "interleaved").glob("*.parquet")
        for r in pq.read_table(p).column("texts").to_pylist()
        for t in r
        if t
    )
    assert not any(re.search(rf"\b{c.name}\b", elsewhere) for c in lexicon)
    for line in (mini_world / "eval" / "text_test.jsonl").read_text().splitlines():
        q = json.loads(line)
        for c in lexicon:
            if re.search(rf"\b{c.name}\b", q["question"]) and q["question"].startswith("What shape"):
                assert q["answer"] == c.shape


def test_rendered_pixels_match_the_scene_record() -> None:
    """The colour at each object's centre is the colour the captions and answers name."""
    for i in range(40):
        scene = sample_scene(np.random.default_rng([9, i]), label_prob=0.0)
        px = np.asarray(render(scene, 128)).astype(int)
        for o in scene.objects:
            row, col = divmod(o.cell, 3)
            x, y = int((col + 0.5 + o.dx) * 128 / 3), int((row + 0.5 + o.dy) * 128 / 3)
            assert np.abs(px[y, x] - np.array(COLOURS[o.colour])).max() <= 12, (i, o)


def test_labels_are_printed_crisply_at_full_resolution_and_blur_at_half() -> None:
    obj = Obj("square", "yellow", "large", cell=4, label="K7W")
    img = render(Scene([obj], background="plain", tone="grey", tone2="beige"), 128)
    font = ImageFont.load_default_imagefont()
    glyphs = Image.new("L", (40, 20), 255)
    from PIL import ImageDraw

    ImageDraw.Draw(glyphs).text((0, 0), "K7W", fill=0, font=font)
    ink = np.asarray(glyphs) < 128
    ys, xs = np.nonzero(ink)
    ink = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    dark = np.asarray(img.convert("L")) < 100

    def found(mask: np.ndarray) -> bool:
        h, w = ink.shape
        return any(
            (mask[y : y + h, x : x + w] == ink).all()
            for y in range(mask.shape[0] - h)
            for x in range(mask.shape[1] - w)
        )

    assert found(dark), "the label's glyphs are not in the image pixel-for-pixel"
    half = np.asarray(img.resize((64, 64), Image.BICUBIC).resize((128, 128), Image.NEAREST).convert("L")) < 100
    assert not found(half)
    unlabelled = render(Scene([replace(obj, label="")], background="plain", tone="grey", tone2="beige"), 128)
    assert (np.asarray(unlabelled.convert("L")) < 100).sum() == 0


def test_position_names_cover_the_grid_and_captions_use_them() -> None:
    assert len(POSITIONS) == 9
    scene = sample_scene(np.random.default_rng(1), n_objects=5)
    from mm1.data.world.language import dense_description

    text = dense_description(scene)
    assert text.startswith("Five shapes") and all(o.colour in text for o in scene.objects)


# ----------------------------------------------------------------------------- the single world


def test_single_world_asks_balanced_questions_whose_answers_only_the_image_gives(tmp_path: Path) -> None:
    from mm1.data.world.build import WORLD_SIZES
    from mm1.data.world.single import SINGLE_COLOURS, SINGLE_SHAPES

    spec = replace(WORLD_SIZES["single"], sft=60, eval_images=40)
    build_world(tmp_path / "a", spec, seed=1, workers=1, verbose=False)
    build_world(tmp_path / "b", spec, seed=1, workers=2, verbose=False)
    assert checksums(tmp_path / "a") == checksums(tmp_path / "b")
    root = tmp_path / "a"
    questions = json.loads((root / "eval" / "vqa_test_questions.json").read_text())["questions"]
    anns = {
        a["question_id"]: a
        for a in json.loads((root / "eval" / "vqa_test_annotations.json").read_text())["annotations"]
    }
    assert len(questions) == 3 * 40
    by_type: dict[str, list[str]] = {}
    for q in questions:
        a = anns[q["question_id"]]
        by_type.setdefault(a["question_type"], []).append(a["multiple_choice_answer"])
        if a["question_type"] != "yes/no":
            assert a["multiple_choice_answer"] not in q["question"].lower()  # the question never names its answer
        assert (root / "eval" / q["file_name"]).is_file()
    assert set(by_type) == {"colour", "shape", "yes/no"} and all(len(v) == 40 for v in by_type.values())
    assert set(by_type["colour"]) <= set(SINGLE_COLOURS) and set(by_type["shape"]) <= set(SINGLE_SHAPES)
    assert 12 <= by_type["yes/no"].count("yes") <= 28
    sft = json.loads((root / "sft" / "train.json").read_text())
    assert len(sft) == 60 and all((root / "sft" / r["image"]).is_file() for r in sft)
    test_pngs = {sha1(p.read_bytes()) for p in (root / "eval" / "images").glob("test_*.png")}
    assert not test_pngs & {sha1(p.read_bytes()) for p in (root / "sft" / "images").glob("*.png")}
    assert (root / "tokenizer.json").is_file() and json.loads((root / "world.json").read_text())["size"] == "single"
