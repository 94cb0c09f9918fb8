"""The demo's report and summary.json put every score beside its blind baseline and its
image-shuffled control, and a text-only score is marked as having no image (null), never 0."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from mm1.experiments import demo_report


def _result(stage, task, metric, shots, score, shuffled):
    return {
        "stage": stage,
        "task": task,
        "metric": metric,
        "shots": shots,
        "score": score,
        "std": 0.0,
        "n": 5,
        "score_shuffled": shuffled,
        "std_shuffled": 0.0 if shuffled is not None else None,
        "image_gain": None if shuffled is None else score - shuffled,
    }


def test_report_and_summary_carry_score_baseline_shuffled_and_image_gain(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_report, "_world_of", lambda run_dir: str(tmp_path))
    runs = {}
    for stage in ("encoder", "pretrain", "sft"):
        runs[stage] = tmp_path / stage
        runs[stage].mkdir()
        (runs[stage] / "metrics.jsonl").write_text(
            "".join(
                json.dumps({"step": i, "loss": 3.0 / i, "loss_shuffled": 3.5 / i, "loss_heldout": 3.0 / i}) + "\n"
                for i in range(1, 6)
            )
        )
        (runs[stage] / "run.json").write_text(json.dumps({"precision": "fp32" if stage == "encoder" else "bf16"}))
    results = [_result("pretrain", "world_vqa", "vqa", k, 30.0 + k, 20.0) for k in (0, 4)]
    # two trials: the per-type table averages them; yes/no scores the same with shuffled images
    results[0]["details"] = [{"other": 1.0, "question_type": {"colour": 80.0, "yes/no": 60.0}}] * 2
    results[0]["details_shuffled"] = [
        {"question_type": {"colour": 10.0, "yes/no": 50.0}},
        {"question_type": {"colour": 20.0, "yes/no": 70.0}},
    ]
    results += [_result("pretrain", "world_caption", "cider", k, 50.0, 49.0) for k in (0, 4)]
    results += [_result("pretrain", "world_text", "exact", 0, 12.0, None)]
    results += [_result("sft", "world_caption", "cider", 0, 70.0, 40.0)]
    baselines = {
        "world_vqa": {
            "score": 25.7,
            "baseline": "answer prior",
            "by_question_type": {"colour": {"score": 12.5, "n": 3}, "yes/no": {"score": 55.0, "n": 2}},
        },
        "world_caption": {"score": 10.0, "baseline": "constant caption"},
    }
    seconds = {"world": 3.0, "encoder": 400.0, "pretrain": 5000.0}
    timing = demo_report.DemoTiming(5403.0, seconds, matmul_gflops=1860.4, precision="bf16", threads=2)
    summary = demo_report.write_demo_report(tmp_path, SimpleNamespace(examples=0), runs, results, baselines, timing)

    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["scores"] == summary["scores"]
    assert saved["precision"] == {"encoder": "fp32", "pretrain": "bf16", "sft": "bf16"}
    vqa4 = next(r for r in saved["scores"] if r["task"] == "world_vqa" and r["shots"] == 4)
    assert (vqa4["score"], vqa4["baseline"], vqa4["score_shuffled"]) == (34.0, 25.7, 20.0)
    assert vqa4["image_gain"] == pytest.approx(14.0)
    vqa0 = next(r for r in saved["scores"] if r["task"] == "world_vqa" and r["shots"] == 0)
    assert vqa0["by_question_type"]["yes/no"] == {"score": 60.0, "score_shuffled": 60.0, "baseline": 55.0, "n": 2}
    assert vqa0["by_question_type"]["colour"]["score_shuffled"] == pytest.approx(15.0)
    assert vqa4["by_question_type"] is None  # no breakdown given: null, not an empty table
    text = next(r for r in saved["scores"] if r["task"] == "world_text")
    assert text["score_shuffled"] is None and text["image_gain"] is None  # no image: null, not a fake 0
    report = (tmp_path / "report.md").read_text()
    assert f"`sft` ({runs['sft']}, bf16)" in report
    wall = "Wall time 1.50 h (world 3 s, encoder 6.7 min, pretrain 83.3 min)"
    assert f"{wall} on a host doing 1860 GFLOP/s (bf16 matrix product, 2 threads). Stages:" in report
    assert saved["stage_seconds"] == seconds and saved["wall_seconds"] == 5403.0
    assert saved["host"] == {"matmul_gflops": 1860.4, "precision": "bf16", "threads": 2}
    assert "| shuffled | image gain | blind baseline |" in report
    assert re.search(
        r"\| pretrain \| world_vqa \| vqa \| 4 \| 34\.00 \| 20\.00 \| \+14\.00 \| 25\.70 \| \+8\.30 \|", report
    )
    assert re.search(r"\| world_text \| exact \| 0 \| 12\.00 \| no image \| no image \|", report)
    assert "## VQA by question type (0-shot)" in report
    assert re.search(r"\| pretrain \| world_vqa \| colour \| 3 \| 80\.0 \| 15\.0 \| \+65\.0 \| 12\.5 \|", report)
    assert re.search(r"\| pretrain \| world_vqa \| yes/no \| 2 \| 60\.0 \| 60\.0 \| \+0\.0 \| 55\.0 \|", report)
    for rel in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (tmp_path / rel).read_bytes()[:4] == b"\x89PNG"
    assert "plots/image_gain_by_shots.png" in report and any("image_gain" in p for p in saved["plots"])


def test_demo_precision_native_follows_the_hardware_and_rejects_unknown_values(monkeypatch):
    from mm1.experiments import demo
    from mm1.train import precision

    assert precision.resolve_precision("fp32") == "fp32"
    assert precision.resolve_precision("bf16") == "bf16"
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "native_bf16", lambda native=native: native)
        assert precision.resolve_precision("native") == want
        assert demo._stage_config(demo.DemoPlan(), "pretrain", []).train.precision == want
    with pytest.raises(ValueError, match="demo: precision must be one of native, fp32, bf16"):
        demo._stage_config(demo.DemoPlan(precision="fp16"), "pretrain", [])


def test_demo_pretraining_freezes_or_slows_the_vit_and_mixes_in_sft_data(monkeypatch, tmp_path):
    from mm1.experiments import demo

    assert {demo._stage_config(demo.DemoPlan(), s, []).model.vision.stem for s in ("encoder", "pretrain", "sft")} == {
        "conv"
    }
    assert demo._stage_config(demo.DemoPlan(stem="patch"), "sft", []).model.vision.stem == "patch"
    # the plan's image size and patch reach every stage: 128 px in the same 8 x 8 tokens as 64 px / patch 8
    large = demo.DemoPlan(image_size=128, patch_size=16)
    sizes = {s: demo._stage_config(large, s, []).model.vision for s in ("encoder", "pretrain", "sft")}
    assert {(v.image_size, v.patch_size, v.grid) for v in sizes.values()} == {(128, 16, 8)}
    # 0 = the preset's own: tiny's 64 px / patch 8, small's 96 px
    assert (demo._stage_config(demo.DemoPlan(), "sft", []).model.vision.image_size, demo.DemoPlan.patch_size) == (64, 0)
    assert demo._stage_config(demo.DemoPlan(preset="small"), "encoder", []).model.vision.image_size == 96
    calls: dict[str, list[str]] = {}

    def fake_stage(plan, out, stage, steps, extra):
        calls[stage] = extra
        return out / stage

    monkeypatch.setattr(demo, "_train_stage", fake_stage)
    monkeypatch.setattr(demo, "resolve_inputs", lambda *a, **k: None)
    # by default a frozen ViT in pre-training, and the world's SFT conversations mixed into MM1's mixture
    frozen = demo.DemoPlan()
    assert (frozen.pretrain_vision_lr_mult, frozen.pretrain_sft_weight, frozen.pretrain_steps) == (0.0, 0.15, 1200)
    demo.train_pretrained(frozen, tmp_path)
    pre = demo._stage_config(frozen, "pretrain", calls["pretrain"])
    assert pre.train.freeze_vision and pre.train.lr_mult.vision == 1.0
    sources = {name: (s.kind, s.path, s.weight) for name, s in pre.data.sources.items()}
    assert sources == {
        "caption": ("caption", "{world}/caption", 0.45),
        "interleaved": ("interleaved", "{world}/interleaved", 0.45),
        "text": ("text", "{world}/text", 0.10),
        "sft": ("sft", "{world}/sft/train.json", 0.15),
    }
    # or a moving ViT at a multiple of the law, and MM1's mixture alone
    plan = demo.DemoPlan(pretrain_vision_lr_mult=0.25, pretrain_sft_weight=0.0)
    demo.train_pretrained(plan, tmp_path)
    cfgs = {s: demo._stage_config(plan, s, extra) for s, extra in calls.items()}
    assert cfgs["pretrain"].train.lr_mult.vision == 0.25 and cfgs["encoder"].train.lr_mult.vision == 1.0
    assert set(cfgs["pretrain"].data.sources) == {"caption", "interleaved", "text"}
    with pytest.raises(ValueError, match="pretrain_sft_weight \\(-0.1\\) must be >= 0"):
        demo.pretrain_overrides(demo.DemoPlan(pretrain_sft_weight=-0.1), tmp_path)
    # the default stage 0 learns the images' tags, LSE-pooled; the MLLM stages still read captions
    enc = cfgs["encoder"]
    assert (enc.train.encoder_objective, enc.data.caption_text, enc.train.superclass_pool) == (
        "superclass",
        "tags",
        "lse",
    )
    assert cfgs["pretrain"].data.caption_text == "caption" and not cfgs["pretrain"].train.freeze_vision
    assert demo._stage_config(plan, "sft", demo.sft_overrides(plan, tmp_path / "pretrain")).train.freeze_vision
    # the contrastive encoder on captions, its SFT moving the ViT
    clip = demo.DemoPlan(encoder_objective="clip", encoder_text="caption", sft_freeze_vision=False)
    demo.train_pretrained(clip, tmp_path)
    enc = demo._stage_config(clip, "encoder", calls["encoder"])
    assert (enc.train.encoder_objective, enc.data.caption_text) == ("clip", "caption")
    assert not demo._stage_config(clip, "sft", demo.sft_overrides(clip, tmp_path)).train.freeze_vision


def test_demo_flags_choose_the_encoder_image_size_and_how_pretraining_treats_the_vit(monkeypatch, tmp_path):
    from mm1.cli import parse_args
    from mm1.experiments import demo

    plans: list[demo.DemoPlan] = []
    monkeypatch.setattr(
        demo,
        "run_demo",
        lambda plan, out: plans.append(plan) or {"report": "", "wall_seconds": 0, "beats_baselines": True},
    )
    demo.run(parse_args(["demo", "--out", str(tmp_path / "a")]))
    argv = ["demo", "--out", str(tmp_path / "b"), "--encoder-objective", "clip", "--encoder-text", "caption"]
    argv += ["--encoder-steps", "150", "--encoder-lr-scale", "1", "--encoder-pool", "mean", "--no-sft-freeze-vision"]
    demo.run(parse_args(argv))
    large = ["demo", "--out", str(tmp_path / "c"), "--image-size", "128", "--patch-size", "16"]
    demo.run(parse_args([*large, "--pretrain-vision-lr-mult", "0.3", "--pretrain-sft-weight", "0"]))
    default, clip, moving = plans
    assert (default.image_size, default.patch_size, default.pretrain_vision_lr_mult) == (0, 0, 0.0)
    assert (default.pretrain_sft_weight, default.pretrain_steps, default.sft_steps) == (0.15, 1200, 300)
    assert (moving.image_size, moving.patch_size, moving.pretrain_vision_lr_mult) == (128, 16, 0.3)
    assert moving.pretrain_sft_weight == 0.0
    assert (default.encoder_objective, default.encoder_text, default.encoder_pool) == ("superclass", "tags", "lse")
    assert default.sft_freeze_vision and (default.encoder_steps, default.encoder_lr_scale) == (900, 2.0)
    assert default.sft_lr_scale == 0.17
    assert (clip.encoder_objective, clip.encoder_text, clip.encoder_pool) == ("clip", "caption", "mean")
    assert not clip.sft_freeze_vision and (clip.encoder_steps, clip.encoder_lr_scale) == (150, 1.0)


def test_run_demo_reports_the_wall_time_of_each_phase(monkeypatch, tmp_path):
    """Each phase's time is its own (a fake clock advances a known amount inside each), summed where a
    phase runs twice (the world is checked twice), and handed to the report beside the total."""
    from mm1.experiments import demo

    clock = [0.0]
    monkeypatch.setattr(demo.time, "perf_counter", lambda: clock[0])

    def costs(seconds, value=None):
        def fake(*args, **kwargs):
            clock[0] += seconds
            return value

        return fake

    stage_cost = {"encoder": 100.0, "pretrain": 700.0, "sft": 200.0}
    monkeypatch.setattr(demo, "resolve_inputs", costs(1.0))
    monkeypatch.setattr(demo, "_train_stage", lambda plan, out, stage, *a: costs(stage_cost[stage], out / stage)())
    monkeypatch.setattr(
        demo, "_evaluate", lambda plan, run, stage, *a, **k: costs(30.0 if stage == "sft" else 90.0, [])()
    )
    monkeypatch.setattr(demo, "_baselines", costs(5.0, {}))
    monkeypatch.setattr(demo, "matmul_gflops", lambda precision: 123.45)
    reported = {}
    monkeypatch.setattr(
        "mm1.experiments.demo_report.write_demo_report",
        lambda out, plan, runs, results, baselines, timing: (
            reported.update(timing=timing) or {"wall_seconds": timing.wall_seconds}
        ),
    )
    demo.run_demo(demo.DemoPlan(precision="bf16"), tmp_path)
    timing = reported["timing"]
    assert (timing.matmul_gflops, timing.precision, timing.threads) == (123.5, "bf16", torch.get_num_threads())
    assert timing.stage_seconds == {
        "world": 2.0,
        "encoder": 100.0,
        "pretrain": 700.0,
        "eval_pretrain": 90.0,
        "sft": 200.0,
        "eval_sft": 30.0,
        "baselines": 5.0,
    }
    assert timing.wall_seconds == sum(timing.stage_seconds.values())


def test_matmul_gflops_measures_this_hosts_product_speed_and_refuses_other_precisions(monkeypatch):
    from mm1.train import precision

    # a clock that says every product took 1 ms: 2 * m * k * n flops per ms, whatever the hardware
    ticks = iter(range(10**6))
    monkeypatch.setattr("time.perf_counter", lambda: next(ticks) * 1e-3)
    assert precision.matmul_gflops("fp32", seconds=0.01, shape=(64, 32, 16)) == pytest.approx(2 * 64 * 32 * 16 / 1e6)
    assert precision.matmul_gflops("bf16", seconds=0.0, shape=(8, 8, 8)) > 0  # at least three products timed
    with pytest.raises(ValueError, match="matmul_gflops: precision must be fp32 or bf16, got 'native'"):
        precision.matmul_gflops("native")
