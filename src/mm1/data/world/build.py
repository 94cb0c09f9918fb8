"""`build_world`: write the whole synthetic world to a folder; `ensure_world`: build it once.

The world is written into a temporary sibling folder and renamed into place at the end, so a
crashed or concurrent build never leaves a half-written world where a trainer would read it.
Items are made independently (see `items.py`), optionally in worker processes whose results are
consumed in order, so the bytes do not depend on the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mm1.data.skips import DataError
from mm1.data.tokenizer import Tokenizer
from mm1.data.world import items
from mm1.data.world.lexicon import lexicon_split, make_lexicon, text_question
from mm1.data.world.single import write_single
from mm1.data.world.writers import ShardWriter, vqa_records, write_parquet
from mm1.data.writers import dumps, write_bytes, write_json, write_jsonl

# 2: interleaved caption / Q&A lines end in a newline; 3: 2-10 images per document;
# 4: SFT 1,500 -> 6,000 conversations in tiny (the demo's SFT saw each ~7 times), 6,000 -> 24,000 in single
# 5: tiny-world shapes drawn larger (radius 0.11 / 0.17 of the side instead of 0.075 / 0.14)
# 6: caption json carries "tags", image-level labels (object categories and colours) an encoder can learn from
# 7: the tags also name the objects' places and their number (a tag-trained encoder kept count and position)
# 8: the tags also name the background (plain, gradient, mottled, striped): the encoder carried it at 46 %, chance 27
# 9: an interleaved document captions its images in one style: the references', alt-text or dense (few-shot role)
GENERATOR_VERSION = "9"


@dataclass(frozen=True)
class WorldSize:
    """How many items each part of the world gets. Counts scale linearly between presets."""

    name: str
    captions: int
    interleaved: int
    text_train: int
    text_test: int
    sft: int
    eval_images: int  # per split: caption refs, VQA questions and one MC question each
    multi_pairs: int  # per split
    text_questions: int  # per split
    lexicon: int = 32  # invented words in the text-only facts
    image_px: int = 128
    vocab_size: int = 2048
    per_shard: int = 1000  # caption samples per tar shard
    per_part: int = 300  # interleaved documents per parquet file
    layout: str = "scenes"  # scenes (the full world) | single (one shape per image: SFT + VQA only, see single.py)

    def scaled(self, factor: float, name: str | None = None) -> WorldSize:
        counts = (
            "captions",
            "interleaved",
            "text_train",
            "text_test",
            "sft",
            "eval_images",
            "multi_pairs",
            "text_questions",
        )
        return replace(
            self,
            name=name or f"{self.name}x{factor:g}",
            **{k: max(2, round(getattr(self, k) * factor)) for k in counts},
        )


TINY = WorldSize(
    "tiny",
    captions=3000,
    interleaved=600,
    text_train=1500,
    text_test=150,
    sft=6000,
    eval_images=200,
    multi_pairs=100,
    text_questions=200,
)
WORLD_SIZES: dict[str, WorldSize] = {
    "tiny": TINY,
    "single": WorldSize(
        "single",
        captions=0,
        interleaved=0,
        text_train=0,
        text_test=0,
        # 24,000 conversations, 8,000 per question type: with 6,000, SFT's 1,200 steps saw each shape
        # image ~8 times and the ViT learned 64 % shape; with 24,000 (one pass) 84 % (docs/grounding.md)
        sft=24000,
        eval_images=300,
        multi_pairs=0,
        text_questions=0,
        layout="single",
    ),
    "small": replace(TINY.scaled(5, "small"), lexicon=64),
    "base": replace(TINY.scaled(25, "base"), lexicon=128),
}


def resolve_size(size: str | WorldSize) -> WorldSize:
    if isinstance(size, WorldSize):
        return size
    if size not in WORLD_SIZES:
        raise ValueError(f"unknown world size {size!r}; choose one of {', '.join(WORLD_SIZES)}")
    return WORLD_SIZES[size]


# ----------------------------------------------------------------------------- parallel map


def _call(job: tuple[Callable[..., Any], tuple]) -> Any:
    fn, args = job
    return fn(*args)


def _imap(fn: Callable[..., Any], args: Iterable[tuple], pool: Any) -> Iterator[Any]:
    jobs = ((fn, a) for a in args)
    if pool is None:
        return map(_call, jobs)
    return pool.imap(_call, jobs, chunksize=32)  # results in submission order: output is worker-independent


# fork needs no `if __name__ == "__main__"` guard in the caller's script and no re-imports; the
# workers only use NumPy and Pillow, so the usual fork hazards (torch/OpenMP state) do not arise
_START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


def default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


# ----------------------------------------------------------------------------- build


def build_world(
    out: str | Path,
    size: str | WorldSize = "tiny",
    seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Write the synthetic world to `out` and return its manifest (also written as world.json)."""
    spec = resolve_size(size)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} already exists and is not empty; pass overwrite=True (mm1 world --force) or choose another folder"
        )
    start = time.perf_counter()
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_workers = default_workers() if workers is None else max(1, workers)
    try:
        pool = mp.get_context(_START_METHOD).Pool(n_workers) if n_workers > 1 else None
        try:
            counts, texts = _write_all(tmp, spec, seed, pool)
        finally:
            if pool is not None:
                pool.terminate()
        Tokenizer.train(texts, spec.vocab_size, tmp / "tokenizer.json")
        manifest = _manifest(tmp, spec, seed, counts)
        write_json(tmp / "world.json", manifest, indent=2)
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)  # fails (OSError) if another build filled `out` meanwhile: theirs stays
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        _print_summary(out, manifest, time.perf_counter() - start, n_workers)
    return manifest


def _write_all(root: Path, spec: WorldSize, seed: int, pool: Any) -> tuple[dict[str, int], list[str]]:
    if spec.layout == "single":
        return write_single(root, spec, seed, lambda fn, args: _imap(fn, args, pool))
    px, counts, texts = spec.image_px, {}, []

    # eval test first: its image hashes are what every other part must avoid
    forbidden: frozenset[str] = frozenset()
    for split in ("test", "train"):
        pool_items = list(
            _imap(items.eval_item, ((seed, i, split, px, forbidden) for i in range(spec.eval_images)), pool)
        )
        pairs = list(_imap(items.multi_item, ((seed, i, split, px, forbidden) for i in range(spec.multi_pairs)), pool))
        counts.update(_write_eval(root / "eval", split, px, pool_items, pairs, texts if split == "train" else []))
        if split == "test":
            forbidden = frozenset(items.digest(it["png"]) for it in pool_items) | frozenset(
                items.digest(p) for it in pairs for p in it["pngs"]
            )
    counts.update(_write_text_eval(root / "eval", spec, seed, texts))

    shards = ShardWriter(root / "caption", spec.per_shard)
    for it in _imap(items.caption_item, ((seed, i, px, forbidden) for i in range(spec.captions)), pool):
        meta = {
            "key": it["key"],
            "caption": it["alt"],
            "alt": it["alt"],
            "dense": it["dense"],
            "width": px,
            "height": px,
            "scene": it["scene"],
            "tags": it["tags"],
        }
        shards.write(it["key"], {"png": it["png"], "txt": it["alt"].encode(), "json": dumps(meta).encode()})
        texts += [it["alt"], it["dense"]]
    shards.close()
    counts["caption"] = shards.count

    rows: list[dict] = []
    part = 0
    for it in _imap(items.interleaved_item, ((seed, i, px, forbidden) for i in range(spec.interleaved)), pool):
        rows.append(it)
        texts.append(" ".join(t for t in it["texts"] if t))
        if len(rows) == spec.per_part:
            write_parquet(root / "interleaved" / f"part-{part:05d}.parquet", rows)
            rows, part = [], part + 1
    if rows:
        write_parquet(root / "interleaved" / f"part-{part:05d}.parquet", rows)
    counts["interleaved"] = spec.interleaved

    # held-out documents live under eval/: a reader given the text/ folder must not train on them
    for split, n in (("train", spec.text_train), ("test", spec.text_test)):
        docs = list(_imap(items.text_item, ((seed, i, split, spec.lexicon) for i in range(n)), pool))
        path = root / "text" / "train.jsonl" if split == "train" else root / "eval" / "text_docs_test.jsonl"
        write_jsonl(path, docs)
        counts[f"text_{split}"] = len(docs)
        if split == "train":
            texts += [d["text"] for d in docs]

    records = []
    for it in _imap(items.sft_item, ((seed, i, px, forbidden) for i in range(spec.sft)), pool):
        paths = [f"images/{it['id']}{'' if len(it['pngs']) == 1 else f'_{j}'}.png" for j in range(len(it["pngs"]))]
        for rel, png in zip(paths, it["pngs"]):
            write_bytes(root / "sft" / rel, png)
        records.append(
            {"id": it["id"], "image": paths[0] if len(paths) == 1 else paths, "conversations": it["conversations"]}
        )
        texts += [t["value"].replace("<image>\n", "") for t in it["conversations"]]
    write_json(root / "sft" / "train.json", records)
    counts["sft"] = len(records)
    return counts, texts


def _write_eval(
    root: Path, split: str, px: int, pool_items: list[dict], pairs: list[dict], texts: list[str]
) -> dict[str, int]:
    images, caps, questions, annotations, mc, multi = [], [], [], [], [], []
    for i, it in enumerate(pool_items):
        image_id, rel = i + 1, f"images/{split}_{i + 1:06d}.png"
        write_bytes(root / rel, it["png"])
        images.append({"id": image_id, "file_name": rel, "width": px, "height": px})
        for c in it["captions"]:
            caps.append({"id": len(caps) + 1, "image_id": image_id, "caption": c})
        qs, anns = vqa_records(image_id, rel, it["vqa"])
        questions += qs
        annotations += anns
        texts += [t for q in it["vqa"] for t in (q["question"], q["answer"])]
        mc.append({"id": f"mc-{split}-{image_id:06d}", "image": rel, **it["mc"]})
        texts += it["captions"]
    for i, it in enumerate(pairs):
        rels = [f"images/multi_{split}_{i + 1:06d}_{c}.png" for c in "ab"]
        for rel, png in zip(rels, it["pngs"]):
            write_bytes(root / rel, png)
        multi.append(
            {
                "id": f"multi-{split}-{i + 1:06d}",
                "images": rels,
                "question": it["question"],
                "answer": it["answer"],
                "question_type": it["question_type"],
            }
        )
    write_json(
        root / f"caption_{split}.json",
        {"info": {"description": f"mm1 synthetic world captions ({split})"}, "images": images, "annotations": caps},
    )
    write_json(root / f"vqa_{split}_questions.json", {"data_subtype": split, "questions": questions})
    write_json(root / f"vqa_{split}_annotations.json", {"data_subtype": split, "annotations": annotations})
    write_jsonl(root / f"mc_{split}.jsonl", mc)
    write_jsonl(root / f"multi_{split}.jsonl", multi)
    return {
        f"eval_images_{split}": len(images),
        f"vqa_{split}": len(questions),
        f"mc_{split}": len(mc),
        f"multi_{split}": len(multi),
    }


def _write_text_eval(root: Path, spec: WorldSize, seed: int, texts: list[str]) -> dict[str, int]:
    lexicon = make_lexicon(seed, spec.lexicon)
    counts = {}
    for split in ("train", "test"):
        rng = items.item_rng(seed, "text_eval", 0 if split == "train" else 1)
        rows, seen = [], set()
        for _ in range(spec.text_questions * 20):
            q, a = text_question(lexicon_split(lexicon, split), rng)
            if q not in seen:
                seen.add(q)
                rows.append({"id": f"text-{split}-q{len(rows) + 1:05d}", "question": q, "answer": a})
            if len(rows) == spec.text_questions:
                break
        write_jsonl(root / f"text_{split}.jsonl", rows)
        counts[f"text_qa_{split}"] = len(rows)
        texts += [r["question"] + " " + r["answer"] for r in rows] if split == "train" else []
    return counts


def _manifest(root: Path, spec: WorldSize, seed: int, counts: dict[str, int]) -> dict:
    part_bytes: dict[str, int] = {}
    files = 0
    for p in sorted(root.rglob("*")):
        if p.is_file():
            top = p.relative_to(root).parts[0]
            part_bytes[top] = part_bytes.get(top, 0) + p.stat().st_size
            files += 1
    return {
        "generator_version": GENERATOR_VERSION,
        "size": spec.name,
        "seed": seed,
        "spec": asdict(spec),
        "counts": counts,
        "bytes": part_bytes,
        "files": files,
    }


def _print_summary(out: Path, m: dict, seconds: float, workers: int) -> None:
    c = m["counts"]
    mb = sum(m["bytes"].values()) / 1e6
    print(
        f"world {m['size']} (seed {m['seed']}) -> {out}  [{seconds:.1f} s, {workers} worker(s), {mb:.1f} MB, "
        f"{m['files']} files]"
    )
    if m["spec"].get("layout") == "single":
        print(
            f"  one shape per image: sft {c['sft']} conversations | vqa train/test {c['vqa_train']}/{c['vqa_test']} "
            f"questions on {c['eval_images_train']}/{c['eval_images_test']} images"
        )
        return
    print(
        f"  caption {c['caption']} pairs | interleaved {c['interleaved']} docs | text {c['text_train']}+"
        f"{c['text_test']} docs | sft {c['sft']} conversations"
    )
    print(
        f"  eval per split (train/test): images {c['eval_images_train']}/{c['eval_images_test']}, "
        f"vqa {c['vqa_train']}/{c['vqa_test']}, mc {c['mc_train']}/{c['mc_test']}, "
        f"multi {c['multi_train']}/{c['multi_test']}, text {c['text_qa_train']}/{c['text_qa_test']}"
    )
    for part, b in sorted(m["bytes"].items()):
        print(f"  {part:<12} {b / 1e6:8.2f} MB")


def ensure_world(data_cfg: Any, verbose: bool = True) -> Path:
    """The world folder named by `data_cfg.world`, built with its size and seed if it is missing."""
    out = Path(data_cfg.world).expanduser()
    manifest = out / "world.json"
    if not manifest.is_file():
        if out.exists() and any(out.iterdir()):
            raise FileNotFoundError(
                f"{out} exists but has no world.json: it is not a complete mm1 world; "
                "delete it or set data.world to another folder"
            )
        try:
            build_world(out, data_cfg.world_preset, data_cfg.world_seed, verbose=verbose)
        except OSError:
            if not manifest.is_file():  # lost a race with a concurrent build: theirs is as good as ours
                raise
        return out
    m = json.loads(manifest.read_text())
    if (m.get("size"), m.get("seed"), m.get("generator_version")) != (
        data_cfg.world_preset,
        data_cfg.world_seed,
        GENERATOR_VERSION,
    ):
        raise DataError(  # the user's folder, not a bug: the CLI prints this one line
            f"{manifest}: world was built with size={m.get('size')!r} seed={m.get('seed')!r} "
            f"generator {m.get('generator_version')!r}, but the config asks for "
            f"data.world_preset={data_cfg.world_preset!r} data.world_seed={data_cfg.world_seed!r} "
            f"(generator {GENERATOR_VERSION}); point data.world to another folder or delete {out}"
        )
    return out
