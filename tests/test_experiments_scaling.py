"""The learning-rate study: best LR per size, the fit of log η = a·ln N + b, and `lr_law.json`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from mm1.config import Config
from mm1.experiments.scaling import best_lr, fit_law, grid_of, load_budget, run_hparams

ROOT = Path(__file__).resolve().parents[1]
A, B = -0.4, -0.214  # the law the fake runs follow


def test_the_fit_recovers_a_known_law_from_noisy_optima():
    rng = np.random.default_rng(0)
    n = np.array([9e6, 85e6, 302e6, 1.2e9])
    lrs = np.exp(-0.4214 * np.log(n) - 0.5535 + rng.normal(0, 0.01, n.size))
    a, b = fit_law(list(n), list(lrs))
    assert a == pytest.approx(-0.4214, abs=0.02) and b == pytest.approx(-0.5535, abs=0.4)
    with pytest.raises(ValueError, match="at least 2"):
        fit_law([1e6], [1e-3])


def test_best_lr_interpolates_between_grid_points_and_flags_the_grid_edge():
    grid = [1e-3, 2e-3, 4e-3, 8e-3]
    true = 3e-3
    losses = [2.0 + (math.log(lr) - math.log(true)) ** 2 for lr in grid]
    lr, edge = best_lr(grid, losses)
    assert lr == pytest.approx(true, rel=1e-6) and not edge
    lr, edge = best_lr(grid, [1.0, 2.0, 3.0, 4.0])  # still falling at the low end
    assert lr == 1e-3 and edge


def test_the_grid_is_an_ablation_spec_over_size_and_lr_with_weight_decay_tied_to_lr():
    spec = load_budget("tiny")  # configs/hparams/budget-tiny.yaml, the schema of `mm1 ablate`
    grid = grid_of(spec)
    from mm1.experiments.ablate import expand

    points = expand(spec)
    assert spec.base == str((ROOT / "configs" / "tiny.yaml").resolve()) and grid.wd_ratios == [0.1]
    assert len(points) == len(grid.sizes) * len(grid.lrs) * len(grid.wd_ratios) * len(grid.seeds) == 15
    for p in points:
        t = p.configs["pretrain"].train
        assert t.weight_decay == pytest.approx(0.1 * t.lr) and t.freeze_vision and t.freeze_connector
        assert p.configs["pretrain"].data.sources["caption"].weight == 0 and p.eval_after == []


class LawRunner:
    """Final loss is a parabola in log LR around exp(A ln N + B); N is reported in run.json like the trainer does."""

    def train(self, cfg: Config, config_path: Path, out: Path, resume: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        n = cfg.model.lm.dim**2 * 100
        opt = math.exp(A * math.log(n) + B)
        loss = 3.0 + 0.3 * (math.log(cfg.train.lr) - math.log(opt)) ** 2
        (out / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": loss + 1.0 / s}) + "\n" for s in range(1, 201))
        )
        (out / "run.json").write_text(json.dumps({"n_trainable_params": n}))

    def evaluate(self, run_dir, cfg, config_path):  # pragma: no cover - the grid evaluates nothing
        raise AssertionError("hparams runs are judged on training loss")


def test_hparams_fits_the_law_of_the_runs_and_writes_it_for_train(tmp_path):
    out = tmp_path / "hp"
    report = run_hparams("tiny", out, LawRunner(), str(ROOT / "configs" / "tiny.yaml"), log=lambda s: None)
    law = json.loads((out / "lr_law.json").read_text())
    # the loss tail (1/s over the last 10 % of steps) is the same for every LR, so the optimum is exact
    assert law["a"] == pytest.approx(A, abs=1e-3) and law["b"] == pytest.approx(B, abs=1e-2)
    assert law["paper"] == {"a": -0.4214, "b": -0.5535} and law["wd_ratio"] == pytest.approx(0.1)
    assert len(law["sizes"]) == 3 and not any(s["at_edge"] for s in law["sizes"])
    text = report.read_text()
    assert "train.lr_law=" in text and "ln η = -0.4000·ln N" in text
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert {Path(i).name for i in images} == {"loss-vs-lr.png", "lr-law.png"}
    for rel in images:
        assert (out / rel).read_bytes()[:4] == b"\x89PNG"
