"""The MM1 lessons: specs that parse for every budget, pooled points and shared stages, and verdicts from
pre-registered claims (one primary metric, Welch / TOST, >= 3 seeds, the image_gain guard rail)."""

from __future__ import annotations

import fnmatch
import json
import math
import re
from pathlib import Path

import pytest

from mm1.config import Config
from mm1.experiments.ablate import AblationSpec
from mm1.experiments.lessons import Claim, Lesson, load_lessons, pooled_points
from mm1.experiments.lessons_report import run_lessons, verdict_counts
from mm1.experiments.sweep import stage_keys
from mm1.experiments.verdicts import judge_claim

LESSONS = {
    "encoder-resolution",
    "encoder-objective",
    "encoder-size",
    "encoder-data",
    "image-tokens",
    "connector-type",
    "data-mix",
    "text-only-data",
    "synthetic-captions",
}
AXIS = "x"
GAIN = [4.0, 5.0, 6.0]  # a baseline that clearly uses the image


def _lesson(*claims: Claim) -> Lesson:
    return Lesson("t", 1, "T", "", list(claims), AblationSpec("t", ""), AXIS, "a")


def _agg(column: str, **arms: list[float]) -> list[dict]:
    return [{"labels": {AXIS: lab}, "column": column, "values": v} for lab, v in arms.items()]


def _verdict(claim: Claim, agg: list[dict], gains: list[float] = GAIN) -> tuple[str, str]:
    res = judge_claim(_lesson(claim), claim, agg, gains)
    return res.verdict, res.why


COL = "world_caption cider@4"
UP = Claim("a beats b", COL, better="a", worse="b")


def test_a_compare_claim_is_reproduced_contradicted_or_inconclusive_by_one_sided_welch():
    assert _verdict(UP, _agg(COL, a=[12.0, 12.5, 11.8], b=[10.0, 10.2, 9.9]))[0] == "reproduced"
    assert _verdict(UP, _agg(COL, a=[10.0, 10.2, 9.9], b=[12.0, 12.5, 11.8]))[0] == "contradicted"
    assert _verdict(UP, _agg(COL, a=[12.0, 8.0, 11.0], b=[10.0, 12.0, 9.0]))[0] == "inconclusive"
    res = judge_claim(_lesson(UP), UP, _agg(COL, a=[12.0, 12.5, 11.8], b=[10.0, 10.2, 9.9]), GAIN)
    assert res.primary.effect == pytest.approx(12.1 - 10.0333, rel=1e-4) and res.primary.ci_low > 0
    assert res.primary.df > 2 and res.seeds == 3


def test_for_losses_and_perplexity_lower_is_better():
    ppl = Claim("a keeps text", "world_text_ppl perplexity@0", better="a", worse="b", images=False)
    agg = _agg("world_text_ppl perplexity@0", a=[20.0, 21.0, 20.5], b=[30.0, 31.0, 29.0])
    verdict, _ = _verdict(ppl, agg, gains=[])  # not about images: no image_gain needed
    res = judge_claim(_lesson(ppl), ppl, agg, [])
    assert verdict == "reproduced" and res.primary.effect == pytest.approx(9.5 - 0.0, rel=1e-6)


def test_no_verdict_rests_on_fewer_than_three_seeds():
    verdict, why = _verdict(UP, _agg(COL, a=[12.0, 12.5], b=[10.0, 10.2, 9.9]))
    assert verdict == "inconclusive" and "fewer than 3 seeds" in why
    verdict, why = _verdict(UP, _agg("other", a=[1.0, 2.0, 3.0], b=[1.0, 2.0, 3.0]))
    assert verdict == "inconclusive" and "not measured" in why


def test_an_image_claim_is_judged_only_where_the_baseline_uses_the_image():
    agg = _agg(COL, a=[12.0, 12.5, 11.8], b=[10.0, 10.2, 9.9])
    verdict, why = _verdict(UP, agg, gains=[0.5, -0.4, 0.1])
    assert verdict == "inconclusive" and why.startswith("baseline does not use the image")
    verdict, why = _verdict(UP, agg, gains=[])
    assert verdict == "inconclusive" and "image_gain not measured" in why
    res = judge_claim(_lesson(UP), UP, agg, GAIN)
    assert res.baseline_image_gain == pytest.approx(5.0) and res.baseline_image_gain_p < 0.05


def test_the_primary_metric_alone_decides_and_secondary_metrics_are_only_reported():
    claim = Claim("a beats b", COL, better="a", worse="b", secondary=["world_vqa *"])
    agg = _agg(COL, a=[12.0, 8.0, 11.0], b=[10.0, 12.0, 9.0]) + _agg(
        "world_vqa vqa@4", a=[50.0, 51.0, 52.0], b=[10.0, 11.0, 12.0]
    )
    res = judge_claim(_lesson(claim), claim, agg, GAIN)
    assert res.verdict == "inconclusive"
    assert [s.column for s in res.secondary] == ["world_vqa vqa@4"] and res.secondary[0].p_value < 0.001


def test_a_similarity_claim_needs_equivalence_within_the_margin_on_every_pair():
    alike = Claim("a ≈ b ≈ c", COL, similar=["a", "b", "c"], margin=1.0)
    close = _agg(COL, a=[10.0, 10.1, 9.9, 10.0], b=[10.1, 10.0, 10.2, 9.9], c=[9.9, 10.0, 10.1, 10.0])
    assert _verdict(alike, close)[0] == "reproduced"
    apart = _agg(COL, a=[10.0, 10.1, 9.9, 10.0], b=[10.1, 10.0, 10.2, 9.9], c=[13.9, 14.0, 14.1, 14.0])
    res = judge_claim(_lesson(alike), alike, apart, GAIN)
    assert res.verdict == "contradicted" and set(res.primary.pair) == {"a", "c"} or set(res.primary.pair) == {"b", "c"}
    noisy = _agg(COL, a=[8.0, 12.0, 10.0], b=[11.0, 9.0, 10.5], c=[10.0, 9.0, 11.0])
    assert _verdict(alike, noisy)[0] == "inconclusive"


def test_the_power_line_sizes_the_paper_effect_by_the_measured_spread():
    claim = Claim("a beats b", COL, better="a", worse="b", paper_effect=0.03)
    res = judge_claim(_lesson(claim), claim, _agg(COL, a=[50.0, 52.0, 48.0], b=[49.0, 51.0, 47.0]), GAIN)
    # effect 3 % of 49 = 1.47 at sd 2: about 2·(1.7+0.85)²·4/1.47² ≈ 24 seeds
    assert 15 <= res.seeds_for_power <= 35 and "this run has 3" in res.power_line
    assert (
        "no paper_effect"
        in judge_claim(_lesson(UP), UP, _agg(COL, a=[1.0, 2.0, 3.0], b=[1.0, 2.0, 3.0]), GAIN).power_line
    )


@pytest.mark.parametrize("budget", ["tiny", "small"])
def test_every_lesson_parses_and_each_primary_metric_is_measured_by_the_budget(budget):
    lessons = load_lessons(budget)
    assert {lesson.name for lesson in lessons} == LESSONS
    metric = {
        "world_caption": "cider",
        "world_vqa": "vqa",
        "world_vqa_label": "vqa",
        "world_text": "exact",
        "world_text_ppl": "perplexity",
    }
    for lesson in lessons:
        spec = lesson.spec
        assert len(spec.seeds) >= 3 and lesson.baseline in spec.axes[0].labels
        tasks = [Path(t).stem for t in spec.eval_tasks]
        columns = [f"{t} {metric[t]}@{k}" for t in tasks for k in spec.eval_shots]
        for claim in lesson.claims:
            assert claim.primary in columns, (lesson.name, claim.text, columns)
            secondary = [
                c
                for c in columns + ["pretrain loss_caption"]
                if any(fnmatch.fnmatchcase(c, g) for g in claim.secondary)
            ]
            assert secondary or not claim.secondary, (lesson.name, claim.secondary)


def test_the_specs_follow_the_paper_contrasts():
    lessons = {lesson.name: lesson for lesson in load_lessons("tiny")}
    mix = lessons["data-mix"].spec.axes[0]
    assert mix.labels == ["100:0", "66:33", "50:50", "33:66", "0:100", "5:5:1"]
    res = lessons["encoder-resolution"].spec.axes[0]
    assert res.values == [[64], [128]] and "world_vqa_label" in lessons["encoder-resolution"].spec.eval_tasks
    synth = lessons["synthetic-captions"].spec.axes[0]
    assert synth.keys == ["pretrain:data.synthetic_caption_ratio"] and synth.values == [[0.07], [0.0]]
    text = lessons["text-only-data"].spec.axes[0].labels
    assert {"caption", "caption+text", "interleaved", "interleaved+text"} <= set(text)


def test_lessons_pool_their_points_and_share_the_baseline_and_its_encoder():
    by_lesson = pooled_points(load_lessons("tiny"))
    points = [p for pts in by_lesson.values() for p in pts]
    runs = {p.run for p in points}
    assert {"baseline__s0", "baseline__s1", "baseline__s2"} <= runs
    users = {name for name, pts in by_lesson.items() if any(p.run == "baseline__s0" for p in pts)}
    assert users == LESSONS  # every lesson's standard arm is the same config
    seed0 = [p for p in points if p.seed == 0 and "encoder" in p.stages]
    encoders = {stage_keys(p)["encoder"] for p in seed0}
    # baseline, 128 px, reconstructive, wide, caption-only: every other arm reuses the baseline encoder
    assert len(encoders) == 5
    objective = {p.labels["objective"]: p for p in by_lesson["encoder-objective"] if p.seed == 0}
    assert objective["contrastive"].run == "baseline__s0" and objective["none"].stages == ["pretrain"]
    assert objective["reconstructive"].configs["encoder"].train.encoder_objective == "aim"
    mix = {p.labels["caption:interleaved:text"]: p for p in by_lesson["data-mix"] if p.seed == 0}
    assert stage_keys(mix["0:100"])["encoder"] == stage_keys(mix["5:5:1"])["encoder"]


def test_the_small_budget_shares_one_encoder_per_config_across_seeds_and_freezes_it_after(monkeypatch):
    from mm1.train import precision

    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    by_lesson = pooled_points(load_lessons("small"))
    points = [p for pts in by_lesson.values() for p in pts]
    encoders = {stage_keys(p)["encoder"] for p in points if "encoder" in p.stages}
    assert len(encoders) == 5  # baseline, 128 px, reconstructive, wide, caption-only: one each, all seeds
    assert len({p.run for p in points}) == 14 * 3
    assert all(p.configs[s].train.precision == "bf16" for p in points for s in p.stages)
    objective = {p.labels["objective"]: p for p in by_lesson["encoder-objective"] if p.seed == 1}
    assert objective["contrastive"].configs["pretrain"].train.freeze_vision
    assert not objective["none"].configs["pretrain"].train.freeze_vision  # a random ViT must train
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert load_lessons("small", only=["image-tokens"])[0].spec.overrides[0] == "train.precision=fp32"
    # the tiny budget leaves precision to the preset and keeps one encoder per seed
    assert "train.precision" not in " ".join(load_lessons("tiny", only=["image-tokens"])[0].spec.overrides)


def test_a_budget_precision_that_is_not_native_fp32_or_bf16_is_refused_with_the_file_named(tmp_path):
    import shutil

    from mm1.experiments.lessons import LESSON_DIR
    from mm1.registry import ConfigError

    shutil.copytree(LESSON_DIR, tmp_path / "lessons")
    budget = tmp_path / "lessons" / "budget-tiny.yaml"
    budget.write_text(budget.read_text() + "precision: fp16\n")
    with pytest.raises(ConfigError, match=r"budget-tiny.yaml: precision must be one of native, fp32, bf16, got 'fp16'"):
        load_lessons("tiny", directory=tmp_path / "lessons")


class LessonRunner:
    """Scores that follow some lessons and contradict others, with a small seed spread and an image gain."""

    def train(self, cfg: Config, config_path: Path, out: Path, resume: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        loss = 3.0 - 0.01 * cfg.model.vision.image_size - 0.01 * cfg.train.seed
        (out / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": loss, "loss_caption": loss}) + "\n" for s in range(1, 11))
        )

    def evaluate(self, run_dir: Path, cfg: Config, config_path: Path) -> list[dict]:
        jitter = [0.0, 0.3, -0.2][cfg.train.seed]
        out = []
        for task in cfg.eval.tasks:
            name = Path(task).stem
            for k in cfg.eval.shots:
                score = 10.0 + jitter + cfg.model.vision.image_size / 8  # resolution helps: reproduced
                score -= cfg.data.synthetic_caption_ratio * 80  # synthetic captions hurt: contradicted
                metric = {
                    "world_caption": "cider",
                    "world_vqa": "vqa",
                    "world_vqa_label": "vqa",
                    "world_text": "exact",
                    "world_text_ppl": "perplexity",
                }[name]
                image = name not in ("world_text", "world_text_ppl")  # text-only tasks have no control: None
                out.append(
                    {
                        "task": name,
                        "shots": k,
                        "metric": metric,
                        "score": score,
                        "score_shuffled": score - 3.0 - jitter if image else None,
                        "image_gain": 3.0 + jitter if image else None,
                    }
                )
        return out


def test_the_lessons_report_and_summary_state_each_claim_with_its_statistics(tmp_path):
    # four lessons cover every kind of claim: compare (reproduced, contradicted), similar, and not about images
    only = ["encoder-resolution", "synthetic-captions", "connector-type", "text-only-data"]
    report = run_lessons("tiny", tmp_path / "lessons", LessonRunner(), only=only, log=lambda s: None)
    text = report.read_text()
    for title in ("Encoder input resolution", "Connector type", "Text-only data", "Synthetic captions"):
        assert f". {title}" in text, title
    assert re.search(r"a higher input resolution scores higher few-shot .* \| \*\*reproduced\*\*", text)
    assert re.search(r"synthetic captions \(7 % of caption data\) raise .* \| \*\*contradicted\*\*", text)
    assert "**Reproduced at this scale:**" in text and "power: " in text
    # every image metric of a claim comes with its image gain per arm, text ones without
    assert re.search(r"\| `world_caption cider_image_gain@4` \| 3\.03 ± 0\.252 \(3\) \| 3\.03 ± 0\.252 \(3\) \|", text)
    assert "perplexity_image_gain" not in text
    assert re.search(r"!\[Encoder input resolution: image gain vs [^]]*\]\(plots/", text)
    for rel in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (tmp_path / "lessons" / rel).is_file()
    summary = json.loads((tmp_path / "lessons" / "summary.json").read_text())
    keys = {
        "lesson",
        "claim",
        "metric",
        "verdict",
        "p_value",
        "effect",
        "ci_low",
        "ci_high",
        "seeds",
        "baseline_image_gain",
    }
    assert all(keys <= set(c) for c in summary)
    assert len(summary) == sum(len(x.claims) for x in load_lessons("tiny", only=only))
    res = next(c for c in summary if c["lesson"] == "encoder-resolution")
    assert res["verdict"] == "reproduced" and res["seeds"] == 3 and res["ci_low"] > 0
    assert res["baseline_image_gain"] == pytest.approx(3.0 + (0.0 + 0.3 - 0.2) / 3)
    assert not any(isinstance(v, float) and math.isnan(v) for c in summary for v in c.values())
    counts = verdict_counts(summary)
    assert counts.get("reproduced", 0) >= 1 and counts.get("contradicted", 0) >= 1
