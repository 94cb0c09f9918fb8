"""Released benchmark layouts: each format reads a tiny fixture written exactly as its authors ship
it (file names, nesting, field names), selected by `format:` in a task spec, and is scored by its
own metric end to end on a tiny model."""

from __future__ import annotations

import base64
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mm1.config import Config
from mm1.data.tokenizer import Tokenizer
from mm1.eval.runner import evaluate, format_average
from mm1.eval.tasks import get_task, load_spec
from mm1.models.build import build_model
from mm1.registry import ConfigError


def _png(colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def _image(path, colour="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(colour))


def _spec_file(folder, name, **fields):
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps({"name": name, **fields}))
    return str(path)


def _spec(folder, name, **fields):
    return get_task(_spec_file(folder, name, **fields))


def _textvqa(root):
    _image(root / "train_images" / "abc123.jpg")
    rows = [
        {
            "question_id": 34602,
            "question": "what is the brand?",
            "image_id": "abc123",
            "image_classes": ["Bottle"],
            "flickr_original_url": "",
            "flickr_300k_url": "",
            "image_width": 16,
            "image_height": 16,
            "answers": ["nokia"] * 7 + ["Nokia", "toshiba", "nokia "],
            "question_tokens": ["what"],
            "set_name": "val",
        }
    ]
    (root / "TextVQA_0.5.1_val.json").write_text(
        json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": rows})
    )


def test_textvqa_reads_the_data_list_with_images_by_image_id(tmp_path):
    _textvqa(tmp_path)
    task = _spec(tmp_path, "textvqa", format="textvqa", test="TextVQA_0.5.1_val.json", image_root="train_images")
    ex = task.test[0]
    assert (task.spec.kind, task.spec.metric) == ("vqa", "vqa")
    assert ex.id == "34602" and ex.images[0].endswith("abc123.jpg") and len(ex.answers) == 10 and ex.target == "nokia"


def test_vizwiz_keeps_unanswerable_as_an_answer_and_says_so_in_the_chat_prompt(tmp_path):
    _image(tmp_path / "val" / "VizWiz_val_00000000.jpg")
    answers = [{"answer": "unanswerable", "answer_confidence": "yes"}] * 6 + [
        {"answer": "dog food", "answer_confidence": "maybe"}
    ] * 4
    (tmp_path / "val.json").write_text(
        json.dumps(
            [
                {
                    "image": "VizWiz_val_00000000.jpg",
                    "question": "What is this?",
                    "answers": answers,
                    "answer_type": "unanswerable",
                    "answerable": 0,
                }
            ]
        )
    )
    task = _spec(tmp_path, "vizwiz", format="vizwiz", test="val.json", image_root="val")
    ex = task.test[0]
    assert ex.id == "VizWiz_val_00000000" and ex.target == "unanswerable" and ex.meta["answer_type"] == "unanswerable"
    assert "Unanswerable" in task.spec.chat_template


def test_gqa_reads_balanced_questions_keyed_by_question_id(tmp_path):
    _image(tmp_path / "images" / "n161313.jpg")
    (tmp_path / "testdev_balanced_questions.json").write_text(
        json.dumps(
            {
                "20968137": {
                    "semantic": [],
                    "entailed": [],
                    "equivalent": ["20968137"],
                    "question": "Is the sky blue?",
                    "imageId": "n161313",
                    "isBalanced": True,
                    "groups": {"global": None, "local": "06-sky_blue"},
                    "answer": "yes",
                    "semanticStr": "",
                    "annotations": {},
                    "types": {"detailed": "verifyAttr", "semantic": "attr", "structural": "verify"},
                    "fullAnswer": "Yes, the sky is blue.",
                }
            }
        )
    )
    task = _spec(tmp_path, "gqa", format="gqa", test="testdev_balanced_questions.json")
    ex = task.test[0]
    assert (task.spec.kind, task.spec.metric) == ("vqa", "exact")
    assert ex.id == "20968137" and ex.answers == ["yes"] and ex.meta["type"] == "verify"


def _pope(root):
    rows = [
        {
            "question_id": i + 1,
            "image": f"COCO_val2014_00000000000{i}.jpg",
            "text": f"Is there a {obj} in the image?",
            "label": label,
        }
        for i, (obj, label) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "yes"), ("kite", "no")])
    ]
    for r in rows:
        _image(root / "val2014" / r["image"], "blue")
    (root / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pope_reads_json_lines_with_yes_no_labels(tmp_path):
    _pope(tmp_path)
    task = _spec(tmp_path, "pope", format="pope", test="coco_pope_random.json", image_root="val2014")
    assert (task.spec.kind, task.spec.metric) == ("vqa", "pope")
    assert [ex.answers for ex in task.test] == [["yes"], ["no"], ["yes"], ["no"]]
    assert task.test[1].question == "Is there a cat in the image?"


def test_textcaps_groups_caption_rows_by_image_and_uses_reference_strs(tmp_path):
    _image(tmp_path / "train_images" / "011e7e629fb9ae7b.jpg")
    refs = ["A bottle of Coca Cola.", "a red can", "Coke on a table", "the can says coca cola", "A soda can."]
    rows = [
        {
            "image_id": "011e7e629fb9ae7b",
            "image_classes": ["Tin can"],
            "flickr_original_url": "",
            "flickr_300k_url": "",
            "image_width": 16,
            "image_height": 16,
            "set_name": "val",
            "image_name": "011e7e629fb9ae7b",
            "image_path": "train/011e7e629fb9ae7b.jpg",
            "caption_id": k,
            "caption_str": refs[k],
            "caption_tokens": [],
            "reference_strs": refs,
            "reference_tokens": [],
        }
        for k in range(5)
    ]
    (tmp_path / "TextCaps_0.1_val.json").write_text(
        json.dumps({"dataset_type": "val", "dataset_name": "textcaps", "dataset_version": "0.1", "data": rows})
    )
    task = _spec(tmp_path, "textcaps", format="textcaps", test="TextCaps_0.1_val.json", image_root="train_images")
    assert len(task.test) == 1 and task.test[0].answers == refs and task.spec.metric == "cider"


def test_nocaps_is_coco_format_and_keeps_each_images_domain(tmp_path):
    images = [
        {
            "id": i,
            "file_name": f"{i:04d}.jpg",
            "open_images_id": "x",
            "height": 16,
            "width": 16,
            "domain": d,
            "date_captured": "",
            "coco_url": "",
            "license": 0,
        }
        for i, d in enumerate(["in-domain", "out-domain"])
    ]
    for img in images:
        _image(tmp_path / "validation" / img["file_name"])
    anns = [{"image_id": i, "id": i * 10 + k, "caption": f"caption {k} of {i}"} for i in range(2) for k in range(10)]
    (tmp_path / "nocaps_val_4500_captions.json").write_text(
        json.dumps({"licenses": [], "info": {}, "images": images, "annotations": anns})
    )
    task = _spec(tmp_path, "nocaps", format="nocaps", test="nocaps_val_4500_captions.json", image_root="validation")
    assert [ex.meta["domain"] for ex in task.test] == ["in-domain", "out-domain"] and len(task.test[0].answers) == 10


def test_scienceqa_img_reads_problems_of_the_split_that_have_an_image(tmp_path):
    base = {
        "hint": "",
        "task": "closed choice",
        "grade": "grade2",
        "subject": "natural science",
        "topic": "x",
        "category": "y",
        "skill": "z",
        "lecture": "",
        "solution": "",
    }
    problems = {
        "5": {
            **base,
            "question": "Which animal is a mammal?",
            "choices": ["frog", "horse"],
            "answer": 1,
            "image": "image.png",
            "split": "test",
            "hint": "Look at the picture.",
        },
        "6": {**base, "question": "Text only?", "choices": ["a", "b"], "answer": 0, "image": None, "split": "test"},
        "7": {
            **base,
            "question": "Train one?",
            "choices": ["a", "b", "c"],
            "answer": 2,
            "image": "image.png",
            "split": "train",
        },
    }
    _image(tmp_path / "images" / "test" / "5" / "image.png")
    _image(tmp_path / "images" / "train" / "7" / "image.png")
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    task = _spec(tmp_path, "sqa", format="scienceqa", test="problems.json", train="problems.json")
    assert [ex.id for ex in task.test] == ["5"] and [ex.id for ex in task.train] == ["7"]
    ex = task.test[0]
    assert ex.options == ["frog", "horse"] and ex.label == 1 and ex.question.startswith("Context: Look at the picture.")


def test_seed_bench_reads_image_questions_with_letter_answers(tmp_path):
    _image(tmp_path / "SEED-Bench-image" / "1454426_2591111986.jpg")
    q = {
        "answer": "B",
        "choice_a": "One",
        "choice_b": "Two",
        "choice_c": "Three",
        "choice_d": "Four",
        "data_id": "1454426_2591111986.jpg",
        "data_type": "image",
        "question": "How many towels are in the image?",
        "question_id": "101669",
        "question_type_id": 5,
    }
    video = {**q, "data_id": "v.mp4", "data_type": "video", "question_id": "9", "question_type_id": 10}
    (tmp_path / "SEED-Bench.json").write_text(
        json.dumps({"question_type": {"Instances Counting": 5, "Action Recognition": 10}, "questions": [q, video]})
    )
    task = _spec(tmp_path, "seed", format="seed_bench", test="SEED-Bench.json")
    assert len(task.test) == 1
    ex = task.test[0]
    assert (
        ex.options == ["One", "Two", "Three", "Four"] and ex.label == 1 and ex.meta["category"] == "Instances Counting"
    )


def _mmmu(root):
    image = {"bytes": _png("green"), "path": "img.png"}
    rows = [
        {
            "id": "validation_Art_1",
            "question": "Which colour dominates <image 1>?",
            "options": "['red', 'green', 'blue']",
            "explanation": "",
            "image_1": image,
            "image_2": None,
            "img_type": "['Paintings']",
            "answer": "B",
            "topic_difficulty": "Easy",
            "question_type": "multiple-choice",
            "subfield": "Art",
        },
        {
            "id": "validation_Math_2",
            "question": "How many sides does the shape in <image 1> have?",
            "options": "[]",
            "explanation": "",
            "image_1": image,
            "image_2": None,
            "img_type": "['Diagrams']",
            "answer": "['4', '4.0']",
            "topic_difficulty": "Easy",
            "question_type": "open",
            "subfield": "Geometry",
        },
    ]
    folder = root / "Art"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "validation-00000-of-00001.parquet")


def test_mmmu_reads_parquet_with_inline_images_options_and_open_answers(tmp_path):
    _mmmu(tmp_path)
    task = _spec(tmp_path, "mmmu", format="mmmu", test=".")
    mc, open_q = task.test
    assert (task.spec.kind, task.spec.metric, task.spec.mc_mode) == ("mc", "mmmu", "generate")
    assert mc.question.startswith("Which colour dominates <image>?\n(A) red\n(B) green\n(C) blue\n")
    assert mc.images == [_png("green")] and mc.label == 1
    assert open_q.options == [] and open_q.answers == ["4", "4.0"] and "single word" in open_q.question


def _mmbench(root, with_rotations=False):
    header = [
        "index",
        "question",
        "hint",
        "A",
        "B",
        "C",
        "D",
        "answer",
        "category",
        "image",
        "source",
        "l2-category",
        "comment",
        "split",
    ]
    b64 = base64.b64encode(_png("yellow")).decode()
    rows = [
        [0, "What colour is it?", "nan", "red", "yellow", "blue", "nan", "B", "attribute", b64, "x", "y", "nan", "dev"],
        [
            1,
            "Which shape?",
            "A plain image.",
            "circle",
            "square",
            "nan",
            "nan",
            "B",
            "shape",
            b64,
            "x",
            "y",
            "nan",
            "dev",
        ],
    ]
    if with_rotations:  # the released circular file: copies at index k * 1e6 + i, images by reference
        rows += [
            [
                1000000,
                "What colour is it?",
                "nan",
                "yellow",
                "blue",
                "red",
                "nan",
                "A",
                "attribute",
                "0",
                "x",
                "y",
                "nan",
                "dev",
            ]
        ]
    (root / "MMBench_DEV_EN.tsv").write_text("\n".join("\t".join(map(str, r)) for r in [header] + rows) + "\n")


def test_mmbench_decodes_base64_images_and_makes_every_rotation(tmp_path):
    _mmbench(tmp_path)
    task = _spec(tmp_path, "mmb", format="mmbench", test="MMBench_DEV_EN.tsv")
    assert task.spec.metric == "circular"
    colour = [ex for ex in task.test if ex.meta["circular_group"] == 0]
    assert [ex.options for ex in colour] == [
        ["red", "yellow", "blue"],
        ["yellow", "blue", "red"],
        ["blue", "red", "yellow"],
    ]
    assert [ex.target for ex in colour] == ["yellow"] * 3 and colour[0].images == [_png("yellow")]
    shape = [ex for ex in task.test if ex.meta["circular_group"] == 1]
    assert len(shape) == 2 and shape[0].question == "A plain image.\nWhich shape?"
    assert len({k for ex in colour for k in ex.image_keys}) == 1  # rotations share the image key


def test_mmbench_reads_released_rotations_as_they_are(tmp_path):
    _mmbench(tmp_path, with_rotations=True)
    task = _spec(tmp_path, "mmb", format="mmbench", test="MMBench_DEV_EN.tsv")
    assert [ex.id for ex in task.test] == ["0", "1", "1000000"]
    assert task.test[2].images == task.test[0].images and task.test[2].meta["circular_shift"] == 1


def test_a_spec_names_a_format_or_a_kind_and_the_two_must_agree(tmp_path):
    (tmp_path / "a.yaml").write_text("test: x.json\n")
    with pytest.raises(ConfigError, match="needs `test` and a `kind`.*or a `format`.*pope"):
        load_spec(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("format: pope\nkind: caption\ntest: x.json\n")
    with pytest.raises(ConfigError, match="format 'pope' is a vqa task"):
        load_spec(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("format: popee\ntest: x.json\n")
    with pytest.raises(ConfigError, match="unknown eval file format; allowed: coco_captions"):
        load_spec(tmp_path / "c.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    tok = Tokenizer.train(
        ["Question: Is there a dog in the image? Short answer: yes no A B C"] * 30, 300, root / "tokenizer.json"
    )
    cfg = Config()
    v, c, lm = cfg.model.vision, cfg.model.connector, cfg.model.lm
    v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_dim = 16, 8, 32, 1, 2, 64
    c.kind, c.num_tokens = "avgpool", 4
    lm.vocab_size, lm.dim, lm.n_layers, lm.n_heads, lm.ffn_dim, lm.max_seq_len = tok.vocab_size, 32, 1, 2, 64, 512
    cfg.model.image_token_id = tok.image_id
    cfg.eval.max_new_tokens, cfg.eval.trials = 3, 1
    torch.manual_seed(0)
    return build_model(cfg.model).eval(), tok, cfg, root


@pytest.mark.parametrize("mc_mode", ["loglik", "generate"])
def test_benchmarks_score_end_to_end_with_their_metrics_and_an_average(tiny, mc_mode):
    model, tok, cfg, root = tiny
    (root / mc_mode).mkdir()
    _pope(root / mc_mode)
    _mmbench(root / mc_mode)
    pope = _spec_file(root / mc_mode, "pope", format="pope", test="coco_pope_random.json", image_root="val2014")
    mmb = _spec_file(root / mc_mode, "mmb", format="mmbench", test="MMBench_DEV_EN.tsv")
    _mmmu(root / mc_mode)
    mmmu = _spec_file(root / mc_mode, "mmmu", format="mmmu", test="Art")
    cfg.eval.mc_mode = mc_mode
    try:
        results = evaluate(model, tok, cfg, [pope, mmb, mmmu], [0], limit=0, log=None)
    finally:
        cfg.eval.mc_mode = "loglik"
    by = {r["task"]: r for r in results}
    details = by["pope"]["details"][0]
    assert set(details) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert by["pope"]["score"] == details["f1"]
    mmb_result = by["mmb"]
    assert mmb_result["mc_mode"] == mc_mode and len(mmb_result["predictions"][0]) == 5
    assert ("{options}" in mmb_result["template"]) == (mc_mode == "generate")
    assert all(("raw" in p) == (mc_mode == "generate") for p in mmb_result["predictions"][0])
    assert all(p["choice"] in (-1, 0, 1, 2) for p in mmb_result["predictions"][0])
    per_group = {}
    for p in mmb_result["predictions"][0]:
        per_group.setdefault(int(p["id"]) % 1_000_000, []).append(p["score"] > 0)
    assert mmb_result["score"] == 100.0 * sum(all(v) for v in per_group.values()) / 2
    assert by["mmmu"]["mc_mode"] == "generate" and by["mmmu"]["score_shuffled"] is not None  # images inline
    line = format_average(results)
    assert line.startswith("average over 3 tasks (MM1-style): 0-shot ")
    assert f"{(by['pope']['score'] + mmb_result['score'] + by['mmmu']['score']) / 3:.2f}" in line
