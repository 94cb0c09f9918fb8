"""`mm1 eval --hf`: a transformers LLaVA folder is scored by mm1's own runner, and an mm1 export scores
exactly what its checkpoint scores on every world task (same predictions item by item)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from references import require  # tests/references.py: skip here, fail under `make test`

require("transformers", module_level=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mm1.cli import main  # noqa: E402
from mm1.config import Config, ConnectorConfig, LMConfig, ModelConfig, VisionConfig, to_yaml  # noqa: E402
from mm1.data.tokenizer import Tokenizer  # noqa: E402
from mm1.models.build import build_model  # noqa: E402
from mm1.train.checkpoint import save_checkpoint  # noqa: E402
from mm1.train.distributed import DistEnv  # noqa: E402

TASKS = "world_caption,world_vqa,world_multi,world_mc,world_text"
CLIP_LIKE = dict(use_cls=True, pre_norm=True, post_norm=False, feature_layer=-2, act="quick_gelu")


def write_run(run: Path, world: Path, connector: ConnectorConfig, vision: dict) -> None:
    """A checkpoint of a tiny random model on the world's tokenizer (weights scaled so that greedy
    picks are far from ties: the comparison is of predictions, not only of scores)."""
    tok = Tokenizer.load(world / "tokenizer.json")
    cfg = Config(
        model=ModelConfig(
            vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=3, heads=2, mlp_dim=64, **vision),
            connector=connector,
            image_token_id=tok.image_id,
            lm=LMConfig(
                vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=1024
            ),
        )
    )
    cfg.data.world = str(world)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def extra(d: Path) -> None:
        (d / "config.yaml").write_text(to_yaml(cfg))
        tok.save(d / "tokenizer.json")

    save_checkpoint(
        run,
        1,
        model,
        opt,
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        env=DistEnv(),
        trainer_state={},
        rank_state={},
        extra=extra,
    )


def results(json_dir: Path) -> dict[str, tuple[float, list[str], list[float], float, list[str]]]:
    """(task, shots) -> (score, every prediction, every option log-likelihood, and the image-shuffled
    control's score and predictions: the runner adds it for any model, --hf included)."""
    out = {}
    for f in sorted(json_dir.glob("*.json")):
        r = json.loads(f.read_text())
        items = r["predictions"][0]
        shuffled = [p["prediction"] for p in (r.get("shuffled_predictions") or [[]])[0]]  # none: text-only task
        out[f.stem] = (
            r["score"],
            [p["prediction"] for p in items],
            [s for p in items for s in p.get("option_scores", [])],
            r["score_shuffled"],
            shuffled,
        )
    return out


@pytest.mark.parametrize(
    "connector,vision,flags",
    [
        (ConnectorConfig(kind="mlp", num_tokens=16), CLIP_LIKE, []),
        (ConnectorConfig(kind="c_abstractor", num_tokens=4), {}, ["--trust-remote-code"]),
    ],
    ids=["mlp", "c_abstractor"],
)
def test_an_export_scores_what_its_checkpoint_scores(tiny_world, tmp_path, connector, vision, flags):
    run, folder = tmp_path / "run", tmp_path / "hf"
    write_run(run, tiny_world, connector, vision)
    assert main(["export", str(run), str(folder)]) == 0
    config = tmp_path / "eval.yaml"  # the same eval settings for both; the model comes from --checkpoint / --hf
    config.write_text(f"data: {{world: {tiny_world}}}\neval: {{max_new_tokens: 6, batch_size: 4}}\n")
    common = [str(config), "--tasks", TASKS, "--shots", "0,2", "--limit", "6"]
    assert main(["eval", *common, "--checkpoint", str(run), "--json", str(tmp_path / "mm1")]) == 0
    assert main(["eval", *common, "--hf", str(folder), *flags, "--json", str(tmp_path / "hf-eval")]) == 0
    ours, theirs = results(tmp_path / "mm1"), results(tmp_path / "hf-eval")
    assert set(ours) == set(theirs) and len(ours) == 10  # 5 tasks x 2 shots
    for key, (score, preds, option_lls, shuffled, shuffled_preds) in ours.items():
        assert theirs[key][0] == pytest.approx(score, abs=1e-9), key
        assert theirs[key][1] == preds, key  # every generated answer, item by item
        assert theirs[key][2] == pytest.approx(option_lls, abs=1e-3), key  # multiple choice log-likelihoods
        assert theirs[key][3] == pytest.approx(shuffled, abs=1e-9) and theirs[key][4] == shuffled_preds, key
    assert sum(r[3] is not None for r in ours.values()) == 8  # the control ran on every task with images
    generated = [p for key, (_, preds, *_) in ours.items() if "world_mc" not in key for p in preds]
    assert sum(bool(p.strip()) for p in generated) > len(generated) // 2  # not a comparison of empty strings


def test_remote_code_runs_only_when_asked(tiny_world, tmp_path, capsys):
    run, folder = tmp_path / "run", tmp_path / "hf"
    write_run(run, tiny_world, ConnectorConfig(kind="avgpool", num_tokens=4), {})
    assert main(["export", str(run), str(folder)]) == 0
    with pytest.raises(SystemExit, match="--trust-remote-code"):
        main(["eval", "--hf", str(folder), "--tasks", "world_vqa", "--shots", "0", "--limit", "2"])
