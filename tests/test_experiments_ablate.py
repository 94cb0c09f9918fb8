"""Ablation specs, point expansion, dedupe, resumable sweeps and the sweep report (with a fake runner)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from mm1.config import Config
from mm1.experiments.ablate import expand, load_spec, parse_spec, unique_runs
from mm1.experiments.results import run_ablation
from mm1.experiments.sweep import stage_dir
from mm1.registry import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _spec(tmp_path: Path, **extra) -> Path:
    data = {
        "name": "demo-sweep",
        "base": TINY,
        "overrides": ["train.steps=7"],
        "axes": {"model.connector.kind": ["avgpool", "attnpool"]},
        "paired": {
            "mixture": {
                "labels": ["100:0", "50:50"],
                "data.sources.caption.weight": [0.9, 0.45],
                "data.sources.interleaved.weight": [0.0, 0.45],
            }
        },
        "seeds": [0, 1],
        "eval": {"tasks": ["world_caption", "world_vqa"], "shots": [0, 4], "limit": 3},
    }
    data.update(extra)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class FakeRunner:
    """Writes a metrics.jsonl and returns scores that depend on the config; can crash on call N."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at = crash_at
        self.trained: list[str] = []
        self.evaluated: list[str] = []

    def train(self, cfg: Config, config_path: Path, out: Path, resume: bool) -> None:
        if self.crash_at is not None and len(self.trained) == self.crash_at:
            raise KeyboardInterrupt  # the sweep is killed here
        self.trained.append(out.name)  # the stage dir: stages/pretrain-<key>
        out.mkdir(parents=True, exist_ok=True)
        offset = 0.5 if cfg.model.connector.kind == "attnpool" else 0.0
        with open(out / "metrics.jsonl", "w") as f:
            for step in range(1, cfg.train.steps + 1):
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "loss": 5.0 / step + offset + 0.01 * cfg.train.seed,
                            "loss_caption": 4.0 / step,
                            "lr": 1e-3,
                        }
                    )
                    + "\n"
                )

    def evaluate(self, run_dir: Path, cfg: Config, config_path: Path) -> list[dict]:
        self.evaluated.append(config_path.parent.name)  # points/<run>/pretrain.yaml
        bonus = 10.0 * cfg.data.sources["caption"].weight
        # the image-shuffled control: shuffling costs half the caption-data bonus
        return [
            {
                "task": t,
                "shots": s,
                "metric": "score",
                "score": bonus + s + cfg.train.seed,
                "score_shuffled": bonus / 2 + s + cfg.train.seed,
                "image_gain": bonus / 2,
            }
            for t in cfg.eval.tasks
            for s in cfg.eval.shots
        ]


def test_axes_and_paired_groups_expand_to_the_product_times_seeds_with_readable_names(tmp_path):
    points = expand(load_spec(_spec(tmp_path)))
    assert len(points) == 2 * 2 * 2
    names = [p.name for p in points]
    assert len(set(names)) == len(names)
    assert "kind=avgpool__mixture=100-0__s0" in names
    for p in points:
        cfg = p.configs["pretrain"]
        assert cfg.train.seed == p.seed and cfg.train.steps == 7 and cfg.eval.limit == 3
        assert cfg.model.connector.kind == p.labels["model.connector.kind"]
        # the paired keys move together
        pair = (cfg.data.sources["caption"].weight, cfg.data.sources["interleaved"].weight)
        assert pair == {"100:0": (0.9, 0.0), "50:50": (0.45, 0.45)}[p.labels["mixture"]]
        assert re.fullmatch(r"[A-Za-z0-9._=+-]+", p.name)


def test_points_with_identical_resolved_configs_share_one_run():
    # width 128 is the tiny preset's default, so "default" and "explicit" resolve to the same config
    spec = parse_spec(
        {
            "base": TINY,
            "axes": {"model.connector.num_tokens": [4, 16]},
            "paired": {"width": {"labels": ["default", "explicit"], "model.vision.width": [128, 128]}},
        }
    )
    points = expand(spec)
    assert len(points) == 4 and len(unique_runs(points)) == 2
    assert points[0].run == points[1].run == points[0].name
    assert points[2].run == points[3].run == points[2].name != points[0].run


def test_fixed_seed_stages_train_once_for_every_seed_and_the_later_stages_still_vary():
    from mm1.experiments.sweep import stage_keys

    spec = {"base": TINY, "stages": ["encoder", "pretrain"], "seeds": [3, 4, 5]}
    per_seed = expand(parse_spec(spec))
    assert len({stage_keys(p)["encoder"] for p in per_seed}) == 3  # default: every seed its own encoder
    points = expand(parse_spec({**spec, "fixed_seed_stages": ["encoder"]}))
    assert {p.configs["encoder"].train.seed for p in points} == {3}
    assert [p.configs["pretrain"].train.seed for p in points] == [3, 4, 5]
    assert len({stage_keys(p)["encoder"] for p in points}) == 1
    assert len({stage_keys(p)["pretrain"] for p in points}) == 3
    assert all("train.seed=3" in p.overrides["encoder"] for p in points)
    with pytest.raises(ConfigError, match="fixed_seed_stages: expected a list of stages"):
        parse_spec({**spec, "fixed_seed_stages": ["encoders"]})


def test_repeated_axis_labels_and_unknown_keys_are_refused_with_the_spec_named(tmp_path):
    with pytest.raises(ConfigError, match="labels"):
        parse_spec({"base": TINY, "axes": {"model.connector.num_tokens": [16, 16]}})
    with pytest.raises(ConfigError, match="spec.yaml.*model.connector.nope"):
        expand(load_spec(_spec(tmp_path, axes={"model.connector.nope": [1, 2]}, paired={})))
    with pytest.raises(ConfigError, match="same length"):
        parse_spec({"base": TINY, "paired": {"m": {"train.lr": [1e-3, 2e-3], "train.steps": [10]}}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_spec({"base": TINY, "axis": {}})


def test_stage_scoped_keys_and_the_stages_axis(tmp_path):
    spec = parse_spec(
        {
            "base": TINY,
            "stages": ["encoder", "pretrain"],
            "stage_overrides": {"encoder": ["train.steps=3"]},
            "paired": {
                "encoder": {
                    "labels": ["clip", "none"],
                    "train.encoder_objective": ["clip", "clip"],
                    "stages": [["encoder", "pretrain"], ["pretrain"]],
                }
            },
            "axes": {"pretrain:train.lr": [0.001]},
        }
    )
    clip, none = expand(spec)
    assert clip.stages == ["encoder", "pretrain"] and none.stages == ["pretrain"]
    assert clip.configs["encoder"].train.steps == 3 and clip.configs["pretrain"].train.steps == 300
    assert clip.configs["encoder"].train.lr is None and clip.configs["pretrain"].train.lr == 0.001
    assert clip.configs["encoder"].train.stage == "encoder" and clip.eval_after == ["pretrain"]


def test_a_killed_sweep_rerun_runs_only_the_missing_points(tmp_path):
    spec = load_spec(_spec(tmp_path))
    out = tmp_path / "sweep"
    crashing = FakeRunner(crash_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(spec, out, crashing, log=lambda s: None)
    finished = {p.parent.name for p in out.glob("points/*/done.json")}
    stage_of = {p.run: stage_dir(p, out, "pretrain").name for p in expand(spec)}
    assert len(finished) == 3 and set(crashing.trained) == {stage_of[r] for r in finished}
    rerun = FakeRunner()
    run_ablation(spec, out, rerun, log=lambda s: None)
    all_runs = set(stage_of)
    assert set(rerun.trained) == {stage_of[r] for r in all_runs - finished} and len(rerun.trained) == 5
    assert set(rerun.evaluated) == all_runs - finished
    third = FakeRunner()
    run_ablation(spec, out, third, log=lambda s: None)
    assert third.trained == [] and third.evaluated == []


def test_a_finished_point_whose_config_changed_is_not_silently_reused(tmp_path):
    out = tmp_path / "sweep"
    run_ablation(load_spec(_spec(tmp_path, seeds=[0])), out, FakeRunner(), log=lambda s: None)
    changed = load_spec(_spec(tmp_path, seeds=[0], overrides=["train.steps=8"]))
    with pytest.raises(RuntimeError, match="different config"):
        run_ablation(changed, out, FakeRunner(), log=lambda s: None)


def test_report_has_mean_std_table_existing_pngs_and_exact_configs(tmp_path):
    out = tmp_path / "sweep"
    report = run_ablation(load_spec(_spec(tmp_path)), out, FakeRunner(), log=lambda s: None)
    text = report.read_text()
    # caption weight 0.9 -> score 9 + shots + seed, seeds 0 and 1 -> mean 9.5, std 0.707
    assert re.search(r"\| avgpool \| 100:0 \| 9\.5 ± 0\.707 \(2\)", text), text
    assert "world_vqa score@4" in text and "pretrain loss" in text
    # each score is followed by its image-shuffled score and image gain (caption weight 0.9: gain 4.5)
    header = next(line for line in text.splitlines() if line.startswith("| model.connector.kind"))
    assert "world_vqa score@4 | world_vqa score_shuffled@4 | world_vqa score_image_gain@4" in header
    assert re.search(r"\| avgpool \| 100:0 \| 9\.5 ± 0\.707 \(2\) \| 5 ± 0\.707 \(2\) \| 4\.5 ± 0 \(2\) \|", text)
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert len(images) == 5  # per axis a score plot and an image-gain plot, + loss curves
    assert sum("image-gain" in rel for rel in images) == 2
    for rel in images:
        assert (out / rel).is_file() and (out / rel).read_bytes()[:4] == b"\x89PNG"
    for link in re.findall(r"\]\((points/[^)]+\.yaml)\)", text):
        cfg = yaml.safe_load((out / link).read_text())
        assert cfg["train"]["steps"] == 7
    assert "`data.sources.caption.weight=0.9`" in text
    summary = json.loads((out / "summary.json").read_text())
    agg = [
        a
        for a in summary["aggregate"]
        if a["column"] == "world_caption score@0"
        and a["labels"] == {"model.connector.kind": "attnpool", "mixture": "50:50"}
    ]
    assert len(agg) == 1 and agg[0]["n"] == 2 and agg[0]["mean"] == pytest.approx(5.0)
    assert (out / "commands.sh").read_text().count(" train ") == 8


def test_points_finished_by_cluster_jobs_are_collected_by_report_only_and_nothing_is_run(tmp_path):
    from mm1.cli import main

    spec_path = _spec(tmp_path, seeds=[0])
    out = tmp_path / "sweep"
    assert main(["ablate", str(spec_path), "--dry-run", "--out", str(out)]) == 0
    commands = (out / "commands.sh").read_text()
    points = expand(load_spec(spec_path))
    assert all(
        f"{stage_dir(p, out, 'pretrain')}.yaml --out {stage_dir(p, out, 'pretrain')}\n" in commands for p in points
    )
    # what `mm1 train ... --out DIR` and `mm1 eval ... --json DIR` leave behind, for two of the four points
    for p in points[:2]:
        sdir, pdir = stage_dir(p, out, "pretrain"), out / "points" / p.run
        (sdir / "checkpoints" / "step-7").mkdir(parents=True)
        (sdir / "metrics.jsonl").write_text(json.dumps({"step": 7, "loss": 1.5}) + "\n")
        (pdir / "eval-pretrain").mkdir()
        for task in ("world_caption", "world_vqa"):
            for k in (0, 4):
                (pdir / "eval-pretrain" / f"{task}_{k}shot.json").write_text(
                    json.dumps({"task": task, "shots": k, "metric": "cider", "score": 3.0 + k})
                )
    half_trained = stage_dir(points[2], out, "pretrain")
    (half_trained / "checkpoints" / "step-3").mkdir(parents=True)
    assert main(["ablate", str(spec_path), "--out", str(out), "--report-only"]) == 0
    assert sorted(p.parent.name for p in out.glob("points/*/done.json")) == sorted(p.run for p in points[:2])
    assert (half_trained / "checkpoints" / "step-3").is_dir()  # a job still running is left alone
    text = (out / "report.md").read_text()
    assert "| avgpool | 100:0 | 3 (1) | 7 (1) |" in text
