"""Tasks read the real formats (COCO captions, VQAv2, JSONL), specs point at local copies, blind
baselines are scored like models, and `evaluate` / `mm1 eval` write one result per (task, shots)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from PIL import Image

from mm1.cli import main
from mm1.config import Config
from mm1.data.tokenizer import Tokenizer
from mm1.eval import runner
from mm1.eval.baselines import answer_prior, best_constant_caption, blind_baseline
from mm1.eval.metrics import cider_scores, vqa_accuracy
from mm1.eval.runner import evaluate, format_table
from mm1.eval.tasks import TASKS, get_task, load_spec
from mm1.models.build import build_model
from mm1.registry import ConfigError

COLOURS = ["red", "blue", "green", "yellow"]


def _img(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A miniature world/eval folder in the layout `mm1 world` writes."""
    root = tmp_path_factory.mktemp("world")
    ev = root / "eval"
    for split, n in (("train", 8), ("test", 4)):
        images, caps, qs, anns, mc, multi, text = [], [], [], [], [], [], []
        for i in range(n):
            col, rel = COLOURS[i % 4], f"images/{split}_{i + 1:06d}.png"
            _img(ev / rel, col)
            images.append({"id": i + 1, "file_name": rel})
            caps += [
                {"id": len(caps) + 1, "image_id": i + 1, "caption": c}
                for c in (f"A {col} square.", f"a plain {col} picture", f"The {col} background.")
            ]
            qs.append(
                {"question_id": (i + 1) * 10, "image_id": i + 1, "question": "What colour is it?", "file_name": rel}
            )
            anns.append(
                {
                    "question_id": (i + 1) * 10,
                    "image_id": i + 1,
                    "question_type": "colour",
                    "answer_type": "other",
                    "multiple_choice_answer": col,
                    "answers": [{"answer": col if k < 8 else "Red.", "answer_id": k + 1} for k in range(10)],
                }
            )
            mc.append(
                {
                    "id": f"mc-{split}-{i}",
                    "image": rel,
                    "question": "What colour is it?",
                    "options": COLOURS,
                    "answer": i % 4,
                    "question_type": "colour",
                }
            )
            multi.append(
                {
                    "id": f"multi-{split}-{i}",
                    "images": [rel, images[0]["file_name"]],
                    "question": "Same colour?",
                    "answer": "yes" if i % 4 == 0 else "no",
                }
            )
            text.append({"id": f"text-{split}-{i}", "question": f"What is {i} plus 1?", "answer": str(i + 1)})
        (ev / f"caption_{split}.json").write_text(json.dumps({"images": images, "annotations": caps}))
        (ev / f"vqa_{split}_questions.json").write_text(json.dumps({"questions": qs}))
        (ev / f"vqa_{split}_annotations.json").write_text(json.dumps({"annotations": anns}))
        _jsonl(ev / f"mc_{split}.jsonl", mc)
        _jsonl(ev / f"multi_{split}.jsonl", multi)
        _jsonl(ev / f"text_{split}.jsonl", text)
    tok = Tokenizer.train(
        [c["caption"] for c in caps] * 20 + ["Question: Short answer: What colour"] * 20, 300, root / "tokenizer.json"
    )
    return root, tok


def test_world_tasks_are_registered_and_read_every_format(world):
    root, _ = world
    assert {"world_caption", "world_vqa", "world_text", "world_multi", "world_mc"} <= set(TASKS.names())
    cap = get_task("world_caption", root)
    assert len(cap.train) == 8 and len(cap.test) == 4 and len(cap.test[0].answers) == 3
    vqa = get_task("world_vqa", root)
    ex = vqa.test[1]
    assert ex.answers.count("blue") == 8 and ex.target == "blue" and ex.meta["question_type"] == "colour"
    assert ex.images[0].endswith("test_000002.png") and ex.image_keys == ex.images
    mc = get_task("world_mc", root).test[2]
    assert mc.options == COLOURS and mc.label == 2 and mc.target == "green"
    multi = get_task("world_multi", root).test[3]
    assert len(multi.images) == 2 and multi.answers == ["no"]
    assert get_task("world_text", root).test[0].answers == ["1"]
    assert get_task("world_multi", root).spec.template.startswith("{images}")


def test_world_text_ppl_scores_the_held_out_documents_like_the_spec_file_it_replaces(world, tiny_model, tmp_path):
    root, tok = world
    model, cfg = tiny_model
    _jsonl(
        root / "eval" / "text_docs_test.jsonl",
        [{"id": f"d{i}", "text": t} for i, t in enumerate(["A red square.", "a plain yellow", "The blue circle."])],
    )
    task = get_task("world_text_ppl", root)
    assert task.spec.kind == "text" and task.spec.metric == "perplexity" and task.spec.train is None
    # what `mm1 lessons` used to write at run time
    (tmp_path / "world_text_ppl.yaml").write_text(
        f"name: world_text_ppl\nkind: text\nmetric: perplexity\ntest: {root / 'eval' / 'text_docs_test.jsonl'}\n"
    )
    cfg = copy.deepcopy(cfg)
    cfg.data.world = str(root)
    (registered,) = evaluate(model, tok, cfg, ["world_text_ppl"], [0], log=None)
    (from_file,) = evaluate(model, tok, cfg, [str(tmp_path / "world_text_ppl.yaml")], [0], log=None)
    assert registered["score"] == from_file["score"] and math.isfinite(registered["score"])
    assert len(task.test) == 3


def test_a_task_spec_file_evaluates_local_copies_with_relative_paths(world, tmp_path):
    root, _ = world
    spec = root / "coco.yaml"  # paths relative to the spec file
    spec.write_text(
        "kind: vqa\nmetric: exact\n"
        "test: {questions: eval/vqa_test_questions.json, annotations: eval/vqa_test_annotations.json}\n"
        'image_root: eval\nstop: ["\\n", "Question:"]\n'
    )
    task = get_task(str(spec))
    assert task.name == "coco" and task.spec.metric == "exact" and len(task.test) == 4
    assert task.spec.stop == ["\n", "Question:"] and task.train == []
    (tmp_path / "bad.yaml").write_text("kind: caption\ntest: x.json\ntemplates: oops\n")
    with pytest.raises(ConfigError, match="unknown task spec keys \\['templates'\\]"):
        load_spec(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="unknown eval task"):
        get_task("no_such_task", root)


def test_reader_errors_name_the_file_and_line(world, tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps({"question": "q", "options": ["a"], "answer": 0}) + "\n")
    (tmp_path / "tr.jsonl").write_text("")
    task = get_task("world_mc", world[0])
    task.spec.test = bad
    with pytest.raises(ValueError, match=f"{bad}:1: multiple choice needs options"):
        task.test
    with pytest.raises(FileNotFoundError, match="caption_test.json: eval file not found"):
        get_task("world_caption", tmp_path).test


def test_blind_baselines_use_the_train_prior_and_the_same_metrics(world):
    root, _ = world
    vqa = get_task("world_vqa", root)
    prior = answer_prior(vqa.train)
    assert prior(vqa.test[0]) in COLOURS  # the most frequent colour answer in train
    result = blind_baseline(vqa)
    assert result["metric"] == "vqa" and 0 <= result["score"] <= 100 and result["n"] == 4
    caption = best_constant_caption(get_task("world_caption", root).train)
    assert caption in {c for ex in get_task("world_caption", root).train for c in ex.answers}
    assert blind_baseline(get_task("world_caption", root))["score"] >= 0


def test_vqa_breakdown_and_blind_prior_are_split_by_question_type():
    """VQAv2's per-answer-type keys stay flat; per question type comes under "question_type", and the
    blind prior reports its own score and item count per type on the same items."""
    from mm1.eval.readers import Example
    from mm1.eval.task_metrics import SCORERS

    def ex(i, qtype, atype, question, answer):
        return Example(
            id=str(i), question=question, answers=[answer] * 10, meta={"question_type": qtype, "answer_type": atype}
        )

    test = [
        ex(0, "colour", "other", "What colour is the star?", "red"),
        ex(1, "colour", "other", "What colour is the star?", "blue"),
        ex(2, "yes/no", "yes/no", "Is there a star?", "yes"),
        ex(3, "yes/no", "yes/no", "Is there a star?", "no"),
        ex(4, "count", "number", "How many stars?", "2"),
    ]
    details = SCORERS.get("vqa").details(test, ["red", "red", "yes", "yes", "3"], Config())
    assert details == {
        "number": 0.0,
        "other": 50.0,
        "yes/no": 50.0,
        "question_type": {"colour": 50.0, "count": 0.0, "yes/no": 50.0},
    }
    untyped = [Example(id="u", question="q", answers=["a"] * 10, meta={"answer_type": "other"})]
    assert "question_type" not in SCORERS.get("vqa").details(untyped, ["a"], Config())

    task = get_task("world_vqa", ".")  # a Task whose splits are set here, not read
    train = [
        ex(10 + i, t, a, q, ans)
        for i, (t, a, q, ans) in enumerate(
            [("colour", "other", "What colour is the star?", "red")] * 2
            + [("yes/no", "yes/no", "Is there a star?", "yes")]
        )
    ]
    task._splits = {"train": train, "test": test}
    prior = blind_baseline(task)
    assert prior["by_question_type"] == {
        "colour": {"score": 50.0, "n": 2},
        "count": {"score": 0.0, "n": 1},
        "yes/no": {"score": 50.0, "n": 2},
    }
    assert prior["score"] == pytest.approx(40.0)


@pytest.fixture(scope="module")
def tiny_model(world):
    _, tok = world
    cfg = Config()
    v, c, lm = cfg.model.vision, cfg.model.connector, cfg.model.lm
    v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_dim = 16, 8, 32, 1, 2, 64
    c.kind, c.num_tokens = "avgpool", 4
    lm.vocab_size, lm.dim, lm.n_layers, lm.n_heads, lm.ffn_dim, lm.max_seq_len = tok.vocab_size, 32, 1, 2, 64, 512
    cfg.model.image_token_id = tok.image_id
    torch.manual_seed(0)
    return build_model(cfg.model).eval(), cfg


def test_evaluate_writes_one_result_per_task_and_shots(world, tiny_model, tmp_path):
    root, tok = world
    model, cfg = tiny_model
    cfg.data.world = str(root)
    cfg.eval.max_new_tokens, cfg.eval.trials = 3, 2
    tasks = ["world_caption", "world_vqa", "world_mc", "world_multi", "world_text"]
    results = evaluate(model, tok, cfg, tasks, [0, 2], limit=2, out_dir=tmp_path, log=None)
    assert [(r["task"], r["shots"]) for r in results] == [(t, k) for t in tasks for k in (0, 2)]
    for r in results:
        saved = json.loads((tmp_path / f"{r['task']}_{r['shots']}shot.json").read_text())
        assert saved["seeds"] == [0, 1] and len(saved["predictions"]) == 2 and len(saved["predictions"][0]) == 2
        assert saved["template"] and saved["config"]["eval"]["trials"] == 2
        assert 0 <= saved["score"] <= 100 or saved["metric"] == "cider"
        if r["shots"] == 2 and r["task"] != "world_text":
            assert all(len(p["demo_ids"]) == 2 for p in saved["predictions"][0])
    mc = next(r for r in results if r["task"] == "world_mc")
    assert all(p["prediction"] in COLOURS for p in mc["predictions"][0])
    # the image-shuffled control, on by default: same queries, each shown another test item's image
    for r in results:
        saved = json.loads((tmp_path / f"{r['task']}_{r['shots']}shot.json").read_text())
        if r["task"] in ("world_caption", "world_vqa", "world_mc"):
            assert saved["image_gain"] == pytest.approx(saved["score"] - saved["score_shuffled"])
            assert len(saved["shuffled_trial_scores"]) == 2
            for real, shuf in zip(saved["predictions"][0], saved["shuffled_predictions"][0]):
                assert shuf["id"] == real["id"] and shuf["image_from"] != real["id"]
                assert shuf["demo_ids"] == real["demo_ids"]
        else:  # text: no image; this fixture's multi items all share one image: no derangement exists
            assert saved["score_shuffled"] is None and saved["image_gain"] is None
            assert saved["shuffle_note"].startswith("text-only" if r["task"] == "world_text" else "no derangement")
    table = format_table(results)
    assert "world_vqa" in table and "2-shot" in table and "±" in table
    lines = table.splitlines()
    vqa = next(i for i, line in enumerate(lines) if line.startswith("world_vqa"))
    assert lines[vqa + 1].strip().startswith("shuffled") and lines[vqa + 2].strip().startswith("image gain")
    text = next(i for i, line in enumerate(lines) if line.startswith("world_text"))
    assert "no image" in lines[text + 1] and "no image" in lines[text + 2] and "0.00" not in lines[text + 2]


def test_the_shuffled_control_can_be_switched_off(world, tiny_model):
    root, tok = world
    model, cfg = tiny_model
    cfg.data.world, cfg.eval.max_new_tokens, cfg.eval.trials, cfg.eval.shuffled_control = str(root), 2, 1, False
    try:
        (r,) = evaluate(model, tok, cfg, ["world_vqa"], [0], limit=2, log=None)
    finally:
        cfg.eval.shuffled_control = True
    assert r["score_shuffled"] is None and r["image_gain"] is None and r["shuffle_note"].startswith("off")
    assert "shuffled_predictions" not in r and "off" in format_table([r]).splitlines()[-1]


SCRIPTED = {
    "world_caption": ["A red square.", "a plain picture of a square", "The blue background.", "green"],
    "world_vqa": ["blue", "Red.", "green", "yellow"],
}


def _recompute(task_name: str, items: list, records: list[dict]) -> float:
    """A trial's score from its saved predictions, with the metric functions and every reference."""
    assert [r["id"] for r in records] == [ex.id for ex in items]
    preds = [r["prediction"] for r in records]
    if task_name == "world_caption":
        per = cider_scores(
            {ex.id: p for ex, p in zip(items, preds)}, {ex.id: ex.answers for ex in items}, tokenizer="python"
        )
        return sum(per.values()) / len(per)
    assert all(len(ex.answers) == 10 for ex in items)  # VQAv2: ten annotators per question
    return sum(100.0 * vqa_accuracy(p, ex.answers) for ex, p in zip(items, preds)) / len(items)


def test_saved_scores_equal_the_metrics_recomputed_from_the_saved_predictions(world, tiny_model, tmp_path, monkeypatch):
    """Generation is scripted (a random tiny model only says nothing scoreable), so the scores are
    far from 0 and any reference the runner leaves out changes them."""
    root, tok = world
    model, cfg = tiny_model
    cfg.data.world, cfg.eval.trials = str(root), 2

    for name in SCRIPTED:
        replies = SCRIPTED[name]
        monkeypatch.setattr(
            runner, "generate", lambda m, t, prompts, images, g, r=replies: [r[i % len(r)] for i in range(len(prompts))]
        )
        (result,) = evaluate(model, tok, cfg, [name], [0], limit=4, out_dir=tmp_path, log=None)
        saved = json.loads((tmp_path / f"{name}_0shot.json").read_text())
        items = get_task(name, root).test[:4]
        recomputed = [_recompute(name, items, trial) for trial in saved["predictions"]]
        assert saved["trial_scores"] == pytest.approx(recomputed, abs=1e-9)
        assert saved["score"] == pytest.approx(sum(recomputed) / len(recomputed), abs=1e-9)
        assert [r["answers"] for r in saved["predictions"][0]] == [ex.answers for ex in items]
        assert saved["score"] > 10 and (name == "world_caption" or saved["score"] < 100)  # partial credit
        if name == "world_vqa":  # each breakdown, real and image-shuffled, recomputed from its own predictions
            for key, trials in (("details", saved["predictions"]), ("details_shuffled", saved["shuffled_predictions"])):
                assert len(saved[key]) == len(trials) == 2
                for details, records in zip(saved[key], trials):
                    per_item = [100.0 * vqa_accuracy(r["prediction"], ex.answers) for ex, r in zip(items, records)]
                    assert details["question_type"] == pytest.approx({"colour": sum(per_item) / len(per_item)})
                    assert details["other"] == pytest.approx(sum(per_item) / len(per_item))


def test_perplexity_task_score_is_exp_of_total_nll_over_total_tokens(world, tiny_model, tmp_path):
    root, tok = world
    model, cfg = tiny_model
    docs = ["A red square.", "The blue background is plain and the green picture is small.", "a plain yellow"]
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs))
    )
    (tmp_path / "ppl.yaml").write_text("kind: text\nmetric: perplexity\ntest: docs.jsonl\n")
    (result,) = evaluate(model, tok, cfg, [str(tmp_path / "ppl.yaml")], [0], log=None)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for text in docs:  # each document scored after an EOS, from its first token on
            ids = torch.tensor([[tok.eos_id] + tok.encode(text)])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
            tokens += ids.shape[1] - 1
    assert result["score"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert sum(r["nll"] for r in result["predictions"][0]) == pytest.approx(nll, rel=1e-4)


def test_evaluate_in_chat_mode_for_models_after_sft(world, tiny_model):
    root, tok = world
    model, cfg = tiny_model
    cfg.data.world, cfg.eval.chat, cfg.eval.trials, cfg.eval.max_new_tokens = str(root), True, 1, 3
    try:
        results = evaluate(model, tok, cfg, ["world_vqa", "world_mc"], [0, 1], limit=2, log=None)
    finally:
        cfg.eval.chat = False
    assert all(r["chat"] and "single word" in r["template"] for r in results)
    one_shot = next(r for r in results if r["task"] == "world_vqa" and r["shots"] == 1)
    assert one_shot["predictions"][0][0]["prompt"].count("[user]") == 2


def test_mm1_eval_blind_prints_a_table(world, capsys):
    root, _ = world
    assert (
        main(
            [
                "eval",
                "configs/tiny.yaml",
                f"data.world={root}",
                "--blind",
                "--tasks",
                "world_caption,world_vqa",
                "--limit",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "world_vqa (blind: answer prior)" in out and "world_caption (blind: constant caption)" in out


def test_question_types_keep_one_slice_of_a_vqa_set(world):
    root, _ = world
    label = get_task("world_vqa_label", root)
    assert label.name == "world_vqa_label" and label.spec.question_types == ["label"]
    assert label.test == [] and label.split("train") == []  # this miniature world asks only about colour
    colour = TASKS.get("world_vqa")(root)
    colour.question_types = ["colour"]
    from mm1.eval.tasks import Task

    assert len(Task(colour).test) == 4 and all(ex.meta["question_type"] == "colour" for ex in Task(colour).test)
