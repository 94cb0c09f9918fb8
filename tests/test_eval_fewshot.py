"""The few-shot protocol: no demonstration ever shows the query's image, the same seed gives the
same prompts in any order, demonstrations are re-drawn per query, and CoT answers are parsed."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mm1.eval.fewshot import build_prompt, build_prompts, extract_answer, render_query, sample_demos
from mm1.eval.tasks import Example, Task, TaskSpec


def _write_vqa(root, split, n_images, shared=()):
    """VQAv2 files: 3 questions per image; `shared` image names also appear in the other split."""
    (root / "images").mkdir(exist_ok=True)
    questions, anns = [], []
    names = [f"{split}_{i}.png" for i in range(n_images)] + list(shared)
    for i, name in enumerate(names):
        if not (root / "images" / name).exists():
            Image.new("RGB", (8, 8), (i * 20 % 255, 0, 0)).save(root / "images" / name)
        for j in range(3):
            qid = (i + 1) * 10 + j
            questions.append(
                {
                    "question_id": qid,
                    "image_id": i + 1,
                    "question": f"q{j} about {name}?",
                    "file_name": f"images/{name}",
                }
            )
            anns.append(
                {
                    "question_id": qid,
                    "image_id": i + 1,
                    "question_type": f"t{j}",
                    "answer_type": "other",
                    "multiple_choice_answer": f"a{i}",
                    "answers": [{"answer": f"a{i}", "answer_id": k + 1} for k in range(10)],
                }
            )
    (root / f"vqa_{split}_questions.json").write_text(json.dumps({"questions": questions}))
    (root / f"vqa_{split}_annotations.json").write_text(json.dumps({"annotations": anns}))
    return {"questions": root / f"vqa_{split}_questions.json", "annotations": root / f"vqa_{split}_annotations.json"}


@pytest.fixture()
def task(tmp_path):
    shared = ("shared_0.png", "shared_1.png")
    train = _write_vqa(tmp_path, "train", 6, shared)
    test = _write_vqa(tmp_path, "test", 4, shared)
    return Task(TaskSpec("toy_vqa", "vqa", test, train, image_root=tmp_path))


def test_no_demonstration_ever_contains_the_query_image(task):
    assert len(task.train) == 24 and len(task.test) == 18
    # the shared images are in both splits: a query on one has 21 of the 24 train items to draw from
    for seed in range(20):
        for q in task.test:
            p = build_prompt(task, q, shots=8, seed=seed)
            assert len(p.demo_ids) == 8 and len(set(p.demo_ids)) == 8
            assert not set(q.image_keys) & set(p.demo_image_keys)
            assert q.images[0] not in p.images[:-1] and p.images[-1] == q.images[0]
    # a pool with too few legal examples is an error, not a silent leak
    crowded = [Example(str(i), ["x.png"], ["x.png"], answers=["a"]) for i in range(5)] + [
        Example("ok", ["y.png"], ["y.png"], answers=["a"])
    ]
    with pytest.raises(ValueError, match="only 1 train examples"):
        sample_demos(crowded, Example("q", ["x.png"], ["x.png"]), 2, __import__("random").Random(0))


def test_same_seed_same_prompts_regardless_of_order_and_batching(task):
    a = build_prompts(task, task.test, 4, seed=3)
    b = build_prompts(task, list(reversed(task.test)), 4, seed=3)[::-1]
    assert [(p.text, p.images, p.demo_ids) for p in a] == [(p.text, p.images, p.demo_ids) for p in b]
    c = build_prompts(task, task.test, 4, seed=4)
    assert [p.demo_ids for p in a] != [p.demo_ids for p in c]
    # re-drawn per query: not every query sees the same demonstrations
    assert len({tuple(p.demo_ids) for p in a}) > 1


def test_prompt_layout_follows_the_template(task):
    q = task.test[0]
    zero = build_prompt(task, q, 0)
    assert zero.text == f"<image>Question: {q.question} Short answer:" and zero.demo_ids == []
    two = build_prompt(task, q, 2, seed=1)
    demos = two.text.split("\n")
    assert len(demos) == 3 and demos[-1] == zero.text
    assert all(d.startswith("<image>Question: ") and " Short answer: a" in d for d in demos[:2])
    assert two.text.count("<image>") == len(two.images) == 3


def test_zero_shot_text_only_demonstrations_when_configured(task):
    task.spec.zero_shot_demos = 2
    p = build_prompt(task, task.test[0], 0)
    assert len(p.demo_ids) == 2 and p.text.count("<image>") == 1 and len(p.images) == 1


def test_chain_of_thought_prompt_and_answer_parsing(tmp_path):
    spec = TaskSpec(
        "cot",
        "text",
        tmp_path / "t.jsonl",
        template="Question: {question} Reasoning: {rationale} So the answer is {answer}",
        cot_marker="So the answer is",
    )
    ex = Example("1", question="What is 2 plus 3?", answers=["5"], rationale="2 and 3 make 5.")
    text, _ = render_query(spec, ex)
    assert text == "Question: What is 2 plus 3? Reasoning:"
    assert extract_answer(" 2 and 3 make 5. So the answer is 5", spec) == "5"
    assert extract_answer(" I think 5", spec) == "I think 5"
    with pytest.raises(Exception, match="no \\{rationale\\} field"):
        TaskSpec("bad", "text", "x", template="Q: {question} A: {answer}", cot_marker="So")


def test_chat_prompts_put_demonstrations_in_earlier_turns(task):
    q = task.test[0]
    zero = build_prompt(task, q, 0, chat=True)
    assert zero.chat == [
        {"role": "user", "content": f"<image>\n{q.question}\nAnswer the question using a single word or phrase."}
    ]
    two = build_prompt(task, q, 2, seed=5, chat=True)
    assert [t["role"] for t in two.chat] == ["user", "assistant"] * 2 + ["user"]
    assert two.demo_ids == build_prompt(task, q, 2, seed=5).demo_ids  # same draw as the plain prompt
    assert len(two.images) == 3 and two.images[-1] == q.images[0]
    assert two.chat[1]["content"].startswith("a")  # the demonstration's answer
