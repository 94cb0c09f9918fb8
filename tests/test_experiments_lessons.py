"""The MM1 lessons: specs that parse for every budget, pooled points, and verdicts decided from the seed spread."""

from __future__ import annotations

import fnmatch
import json
import math
import re
from pathlib import Path

import pytest

from mm1.config import Config
from mm1.experiments.lessons import (claim_outcome, judge_compare, judge_similar, load_lessons, pooled_points)
from mm1.experiments.lessons_report import run_lessons, verdict_counts

LESSONS = {"encoder-resolution", "encoder-objective", "image-tokens", "connector-type", "caption-interleaved",
           "text-only-data", "synthetic-captions"}


def test_a_difference_beyond_two_standard_errors_reproduces_and_within_does_not():
    up = judge_compare((12.0, 0.5, 2), (10.0, 0.5, 2), "world_vqa vqa@4")  # d=2, se=0.5
    assert up.reproduced is True and up.effect == pytest.approx(2.0) and up.se == pytest.approx(0.5)
    noisy = judge_compare((12.0, 2.0, 2), (10.0, 2.0, 2), "world_vqa vqa@4")  # se=2: within the spread
    assert noisy.reproduced is False and "within the seed spread" in noisy.detail
    opposite = judge_compare((8.0, 0.1, 3), (10.0, 0.1, 3), "world_vqa vqa@4")
    assert opposite.reproduced is False and "opposite" in opposite.detail
    one_seed = judge_compare((12.0, math.nan, 1), (10.0, math.nan, 1), "world_vqa vqa@4")
    assert one_seed.reproduced is None and "one seed" in one_seed.detail


def test_for_losses_and_perplexity_lower_is_better():
    assert judge_compare((2.0, 0.01, 2), (2.5, 0.01, 2), "pretrain loss_caption").reproduced is True
    assert judge_compare((30.0, 0.1, 2), (20.0, 0.1, 2), "world_text_ppl perplexity@0").reproduced is False


def test_alike_means_reproduce_a_similarity_claim_and_a_spread_out_range_does_not():
    alike = judge_similar([(10.0, 1.0, 2), (10.5, 1.0, 2), (9.8, 1.0, 2)], "c")
    assert alike.reproduced is True and alike.effect == pytest.approx(0.7)
    apart = judge_similar([(10.0, 0.1, 2), (14.0, 0.1, 2)], "c")
    assert apart.reproduced is False
    # outside the spread, but smaller than the reference lesson's effect (e.g. 4 -> 16 tokens)
    smaller = judge_similar([(10.0, 0.1, 2), (11.0, 0.1, 2)], "c", reference_effect=-5.0)
    assert smaller.reproduced is True and "reference" in smaller.detail


def test_a_metric_on_which_every_run_scored_the_same_decides_nothing():
    flat = judge_compare((0.0, 0.0, 2), (0.0, 0.0, 2), "world_vqa vqa@4")
    assert flat.reproduced is None and "no signal" in flat.detail
    assert judge_similar([(0.0, 0.0, 2), (0.0, 0.0, 2)], "world_vqa vqa@4").reproduced is None
    yes = judge_compare((12.0, 0.1, 2), (10.0, 0.1, 2), "a")
    no = judge_compare((10.0, 0.1, 2), (12.0, 0.1, 2), "b")
    assert claim_outcome([flat, flat]) == "undecided"
    assert claim_outcome([yes, flat, flat]) == "reproduced" and claim_outcome([no, flat]) == "not reproduced"


def test_claim_outcome_is_the_majority_of_measured_metrics():
    yes = judge_compare((12.0, 0.1, 2), (10.0, 0.1, 2), "a")
    no = judge_compare((10.0, 0.1, 2), (12.0, 0.1, 2), "b")
    assert claim_outcome([yes, yes, no]) == "reproduced"
    assert claim_outcome([yes, no]) == "partly reproduced"
    assert claim_outcome([no, no]) == "not reproduced"
    assert claim_outcome([]) == "not measured"


@pytest.mark.parametrize("budget", ["tiny", "small"])
def test_every_lesson_parses_and_each_claim_is_measured_by_the_budget(budget):
    lessons = load_lessons(budget)
    assert {lesson.name for lesson in lessons} == LESSONS
    for lesson in lessons:
        spec = lesson.spec
        shots = spec.eval_shots
        tasks = [Path(t).stem for t in spec.eval_tasks]
        metric = {"world_caption": "cider", "world_vqa": "vqa", "world_text": "exact", "world_text_ppl": "perplexity"}
        columns = [f"{t} {metric[t]}@{k}" for t in tasks for k in shots] + ["pretrain loss", "pretrain loss_caption"]
        for claim in lesson.claims:
            measured = [c for c in columns if any(fnmatch.fnmatchcase(c, g) for g in claim.metrics)]
            assert measured, (lesson.name, claim.text, columns)


def test_lessons_pool_their_points_and_the_shared_baseline_trains_once_per_seed():
    by_lesson = pooled_points(load_lessons("tiny"))
    points = [p for pts in by_lesson.values() for p in pts]
    runs = {p.run for p in points}
    assert len(runs) == 22  # 11 distinct configs x 2 seeds
    assert {"baseline__s0", "baseline__s1"} <= runs
    users = {name for name, pts in by_lesson.items() if any(p.run == "baseline__s0" for p in pts)}
    assert users == LESSONS  # every lesson's default setting is the same config
    objective = {p.labels["objective"]: p for p in by_lesson["encoder-objective"] if p.seed == 0}
    assert objective["contrastive"].stages == ["encoder", "pretrain"] and objective["none"].run == "baseline__s0"
    assert objective["reconstructive"].configs["encoder"].train.encoder_objective == "aim"


class LessonRunner:
    """Scores that follow some lessons and contradict others, with a small seed spread."""

    def train(self, cfg: Config, config_path: Path, out: Path, resume: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        loss = 3.0 - 0.01 * cfg.model.vision.image_size - 0.01 * cfg.train.seed
        (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": loss, "loss_caption": loss})
                                                   + "\n" for s in range(1, 11)))

    def evaluate(self, run_dir: Path, cfg: Config, config_path: Path) -> list[dict]:
        jitter = 0.1 * cfg.train.seed
        out = []
        for task in cfg.eval.tasks:
            name = Path(task).stem
            for k in cfg.eval.shots:
                score = 10.0 + jitter + cfg.model.vision.image_size / 8  # resolution helps: reproduced
                score -= cfg.data.synthetic_caption_ratio * 8  # synthetic captions hurt: not reproduced
                metric = {"world_caption": "cider", "world_vqa": "vqa", "world_text": "exact",
                          "world_text_ppl": "perplexity"}[name]
                has_image = name in ("world_caption", "world_vqa")
                shuffled = score - cfg.model.vision.image_size / 16 if has_image else None
                out.append({"task": name, "shots": k, "metric": metric, "score": score, "score_shuffled": shuffled,
                            "image_gain": score - shuffled if has_image else None})
        return out


def test_the_lessons_report_covers_every_lesson_and_states_verdicts_from_the_numbers(tmp_path):
    report = run_lessons("tiny", tmp_path / "lessons", LessonRunner(), log=lambda s: None)
    text = report.read_text()
    for title in ("Encoder input resolution", "Encoder pre-training objective", "Number of image tokens",
                  "Connector type", "Caption vs interleaved data", "Text-only data", "Synthetic captions"):
        assert f". {title}" in text, title
    assert re.search(r"a higher input resolution scores higher \| .* \| \*\*reproduced\*\*", text)
    assert re.search(r"dense synthetic captions raise few-shot scores .* \| \*\*not reproduced\*\*", text)
    assert "**Reproduced at this scale:**" in text and "**Not reproduced at this scale:**" in text
    for rel in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (tmp_path / "lessons" / rel).is_file()
    for lesson in LESSONS:
        assert (tmp_path / "lessons" / f"{lesson}.md").is_file()
    # every image metric of a claim comes with its image gain (here resolution / 16), text ones without
    assert re.search(r"\| `world_vqa vqa_image_gain@\d` \| 4 ± 0 \(2\) \| 2 ± 0 \(2\) \|", text), text
    assert "text_image_gain" not in text and "exact_image_gain" not in text
    assert re.search(r"!\[Encoder input resolution: image gain vs [^]]*\]\(plots/", text)
    summary = json.loads((tmp_path / "lessons" / "summary.json").read_text())
    counts = verdict_counts(summary)
    assert counts.get("reproduced", 0) >= 1 and counts.get("not reproduced", 0) >= 1
