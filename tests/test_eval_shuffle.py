"""The image-shuffled control: a seeded derangement in which no query keeps (any of) its own image,
and prompts that change only the query's image(s) while the demonstrations stay as they were."""

from __future__ import annotations

import pytest

from mm1.eval.fewshot import build_prompt
from mm1.eval.shuffle import derange, shuffled_donors
from mm1.eval.tasks import Example, Task, TaskSpec


def _items(keys: list[list[str]]) -> list[Example]:
    return [Example(f"q{i}", list(k), list(k), question=f"question {i}?", answers=["a"]) for i, k in enumerate(keys)]


def test_no_query_keeps_its_own_image_and_shared_images_never_swap_with_each_other():
    # 3 questions per image (VQA-style): a plain index derangement would often keep the picture
    items = _items([[f"img{i // 3}.png"] for i in range(30)])
    for seed in range(50):
        donor = derange([ex.image_keys for ex in items], seed)
        assert sorted(donor) == list(range(30))  # a permutation: every image is shown exactly once
        for i, j in enumerate(donor):
            assert j != i and items[j].image_keys != items[i].image_keys


def test_multi_image_queries_get_another_items_images_with_no_overlap():
    items = _items([[f"a{i}.png", f"b{i}.png"] for i in range(6)] + [["a0.png", "c.png"]])
    for seed in range(30):
        donor = derange([ex.image_keys for ex in items], seed)
        assert all(not set(items[i].image_keys) & set(items[j].image_keys) for i, j in enumerate(donor))


def test_the_derangement_is_seeded_and_reproducible():
    items = _items([[f"{i}.png"] for i in range(20)])
    keys = [ex.image_keys for ex in items]
    assert derange(keys, 7) == derange(list(keys), 7)
    assert derange(keys, 7) != derange(keys, 8)
    donors_a, _ = shuffled_donors(items, 0, "t")
    donors_b, _ = shuffled_donors(items, 0, "t")
    assert [d.id for d in donors_a] == [d.id for d in donors_b]
    assert [d.id for d in donors_a] != [d.id for d in shuffled_donors(items, 1, "t")[0]]


def test_two_items_swap_and_impossible_cases_are_reported_not_faked():
    two = _items([["x.png"], ["y.png"]])
    for seed in range(10):
        assert derange([ex.image_keys for ex in two], seed) == [1, 0]
    with pytest.raises(ValueError, match="at least 2"):
        derange([["x.png"]], 0)
    with pytest.raises(ValueError, match="no image derangement"):
        derange([["x.png"], ["x.png"], ["y.png"]], 0)  # two of three share one image
    donors, note = shuffled_donors(_items([[], []]), 0, "t")
    assert donors is None and note.startswith("text-only")
    donors, note = shuffled_donors(_items([["x.png"], ["x.png"], ["y.png"]]), 0, "t")
    assert donors is None and note.startswith("no derangement")
    mixed = _items([["x.png"], [], ["y.png"]])  # the text-only item keeps its (absent) image
    donors, _ = shuffled_donors(mixed, 0, "t")
    assert donors[1] is None and donors[0].id == "q2" and donors[2].id == "q0"


@pytest.fixture()
def task(tmp_path):
    rows = [
        Example(f"tr{i}", [f"/imgs/tr{i}.png"], [f"/imgs/tr{i}.png"], question=f"q{i}?", answers=[f"a{i}"])
        for i in range(10)
    ]
    test = [
        Example(f"te{i}", [f"/imgs/te{i}.png"], [f"/imgs/te{i}.png"], question=f"t{i}?", answers=[f"b{i}"])
        for i in range(4)
    ]
    t = Task(TaskSpec("toy", "vqa", {"questions": "-", "annotations": "-"}))
    t._splits = {"train": rows, "test": test}
    return t


@pytest.mark.parametrize("chat", [False, True])
def test_the_shuffled_prompt_changes_only_the_query_image_and_keeps_the_demonstrations(task, chat):
    donors, _ = shuffled_donors(task.test, 0, task.name)
    for q, d in zip(task.test, donors):
        real = build_prompt(task, q, 4, seed=3, chat=chat)
        shuf = build_prompt(task, q, 4, seed=3, chat=chat, image_donor=d)
        assert shuf.demo_ids == real.demo_ids and shuf.demo_image_keys == real.demo_image_keys
        assert shuf.text == real.text and shuf.chat == real.chat  # same words, demonstrations and question
        assert shuf.images[:-1] == real.images[:-1]  # demonstrations keep their images
        assert real.images[-1] == q.images[0] and shuf.images[-1] == d.images[0] != q.images[0]


def test_a_multi_image_query_shows_all_of_the_donors_images():
    spec = TaskSpec("toy_multi", "multi", "-")
    t = Task(spec)
    q = Example("m0", ["a.png", "b.png"], ["a.png", "b.png"], question="same?", answers=["no"])
    donor = Example("m1", ["c.png", "d.png", "e.png"], ["c.png", "d.png", "e.png"], question="x?", answers=["y"])
    t._splits = {"train": [], "test": [q, donor]}
    p = build_prompt(t, q, 0, image_donor=donor)
    assert p.images == donor.images and p.text.count("<image>") == 3 and "same?" in p.text
