"""The trainer end to end on the tiny world: every stage runs, the loss falls, the LR law is what
was used, stages chain (encoder -> pretrain -> high-resolution SFT), non-finite losses are caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import mm1.train
from mm1.config import config_from_dict, load_config
from mm1.models.build import build_model
from mm1.train.checkpoint import read_checkpoint_weights
from mm1.train.distributed import DistEnv
from mm1.train.metrics import read_metrics
from mm1.train.optim import count_trainable, mm1_lr
from mm1.train.stages import MLLMObjective, build_stage_module
from mm1.train.trainer import NonFiniteLoss, train

SMALL = ["model.lm.n_layers=2", "model.vision.depth=2", "data.seq_len=128", "data.batch_size=2", "train.warmup_steps=5"]


def cfg_for(world: Path, *extra: str):
    return load_config("configs/tiny.yaml", [f"data.world={world}", *SMALL, *extra])


@pytest.fixture(scope="module")
def pretrain_run(tiny_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "run"
    train(cfg_for(tiny_world, "train.steps=24", "train.save_every=12", "train.eval_every=10"), out)
    return out


def test_pretrain_loss_falls_and_every_step_is_logged(pretrain_run):
    rows = read_metrics(pretrain_run)
    assert [r["step"] for r in rows] == list(range(1, 25))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 1.5, (first, last)
    for key in ("loss", "lr", "lm_loss", "grad_norm", "tokens_per_s", "images_per_s", "tokens", "images"):
        assert all(key in r for r in rows), key
    assert any(k.startswith("loss_") and k != "loss_" for k in rows[0])  # loss per source kind
    # the image-reliance probe every train.eval_every=10 steps and at the last: own vs deranged images
    probed = [r["step"] for r in rows if "loss_shuffled" in r]
    assert probed == [10, 20, 24] and all("loss_probe" in r for r in rows if r["step"] in probed)
    assert all(0 < r["loss_probe"] < 20 and 0 < r["loss_shuffled"] < 20 for r in rows if r["step"] in probed)
    assert all(r["loss_shuffled"] != r["loss_probe"] for r in rows if r["step"] in probed)
    assert sorted(p.name for p in (pretrain_run / "checkpoints").iterdir()) == ["step-12", "step-24"]
    saved = config_from_dict(yaml.safe_load((pretrain_run / "config.yaml").read_text()))
    assert saved.train.steps == 24 and saved.model.lm.n_layers == 2


def test_unset_lr_gives_the_mm1_law_for_the_trainable_parameter_count(pretrain_run, tiny_world):
    cfg = cfg_for(tiny_world)
    n = count_trainable(build_model(cfg.model))
    info = json.loads((pretrain_run / "run.json").read_text())
    assert info["n_trainable_params"] == n and info["lr_source"] == "mm1_law"
    peak = max(r["lr"] for r in read_metrics(pretrain_run))
    assert peak == pytest.approx(mm1_lr(n), rel=1e-12)
    assert info["weight_decay"] == pytest.approx(0.1 * peak)  # λ, decoupled
    assert info["torch_weight_decay"] == pytest.approx(0.1)  # what AdamW gets: λ / η_peak


def test_load_checkpoint_gives_model_config_and_tokenizer(pretrain_run):
    model, cfg, tok = mm1.train.load_checkpoint(pretrain_run)
    assert cfg.train.steps == 24 and tok.image_id == cfg.model.image_token_id
    weights = read_checkpoint_weights(pretrain_run / "checkpoints" / "step-24")
    assert torch.equal(model.lm.norm.weight, weights["lm.norm.weight"])
    ids = torch.tensor([tok.encode("a red circle")])
    assert model(ids).logits.shape == (1, ids.shape[1], cfg.model.lm.vocab_size)


def test_a_run_dir_is_not_overwritten_without_resume(pretrain_run, tiny_world):
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg_for(tiny_world, "train.steps=1"), pretrain_run)


@pytest.mark.parametrize("objective", ["clip", "siglip", "aim", "superclass"])
def test_encoder_stage_trains_and_hands_its_vit_to_the_mllm(objective, tiny_world, tmp_path):
    out = tmp_path / objective
    result = train(
        cfg_for(tiny_world, "train.stage=encoder", f"train.encoder_objective={objective}", "train.steps=3"), out
    )
    assert result["final_loss"] is not None and all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(out))
    saved = read_checkpoint_weights(out / "checkpoints" / "step-3")
    cfg = cfg_for(tiny_world, f"train.init_from={out}")
    module = build_stage_module(cfg, 2048, set(), DistEnv(), "single")
    vit = module.mllm.vision.state_dict()
    assert vit and all(torch.equal(v, saved[f"vision.{k}"]) for k, v in vit.items())


def test_hard_negative_captions_swap_only_the_grouped_words_and_flag_captions_without_any(tiny_world, tmp_path):
    from mm1.data.tokenizer import Tokenizer
    from mm1.train.encoder import WordSwapper

    tok = Tokenizer.load(tiny_world / "tokenizer.json")
    swap = WordSwapper([["circle", "square", "star"], ["not a single token here", "x"]], tok.encode)
    assert len(swap.groups) == 2  # " circle"/"circle" forms; the multi-token group is skipped
    rows = [tok.encode(" two red circle and a blue star"), tok.encode(" nice picture of red things")]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    neg, changed = swap(ids, torch.Generator().manual_seed(0))
    assert changed.tolist() == [True, False] and torch.equal(neg[1], ids[1])
    words = tok.decode(neg[0].tolist()).split()
    assert words[:2] == ["two", "red"] and words[2] != "circle" and words[2] in ("square", "star")
    assert words[-1] != "star" and words[-1] in ("circle", "square")
    cfg = cfg_for(tiny_world, "train.stage=encoder", "train.steps=2", "train.hard_negatives=[[circle,square,star]]")
    assert train(cfg, tmp_path / "hn")["final_loss"] is not None


def test_the_tiny_presets_hard_negatives_change_every_caption_that_names_a_shape(tiny_world):
    """Plural shape words are tokens of their own: a preset listing only singulars left captions such
    as "two red stars" with nothing to swap, so they never asked the encoder for shape."""
    import json

    from mm1.config import load_config, preset_path
    from mm1.data.tokenizer import Tokenizer
    from mm1.data.world.language import plural
    from mm1.data.world.scenes import SHAPES
    from mm1.train.encoder import WordSwapper

    tok = Tokenizer.load(tiny_world / "tokenizer.json")
    swap = WordSwapper(load_config(preset_path("tiny"), []).train.hard_negatives, tok.encode)
    coco = json.loads((tiny_world / "eval" / "caption_test.json").read_text())
    captions = [a["caption"] for a in coco["annotations"]]
    words = {w for s in SHAPES for w in (s, plural(s))}
    naming = [c for c in captions if words & set(c.lower().replace(",", " ").replace(".", " ").split())]
    assert len(naming) > 100 and any(plural(s) in c for c in naming for s in SHAPES)
    rows = [tok.encode(c) for c in naming]
    ids = torch.tensor([r + [0] * (max(map(len, rows)) - len(r)) for r in rows])
    _, changed = swap(ids, torch.Generator().manual_seed(0))
    unchanged = [c for c, ok in zip(naming, changed.tolist()) if not ok]
    assert not unchanged, f"{len(unchanged)} captions kept their shape words, e.g. {unchanged[:3]}"


def test_sft_starts_from_pretrain_at_higher_resolution_with_subimages(pretrain_run, tiny_world, tmp_path):
    over = [
        "train.stage=sft",
        f"train.init_from={pretrain_run}",
        "model.vision.image_size=96",
        "model.subimage_grid=2",
        "data.seq_len=256",
        "data.batch_size=1",
        "train.steps=2",
    ]
    cfg = cfg_for(tiny_world, *over)
    module = build_stage_module(cfg, 2048, set(), DistEnv(), "single")
    pre = read_checkpoint_weights(pretrain_run / "checkpoints" / "step-24")
    assert torch.equal(module.mllm.lm.tok_embeddings.weight, pre["lm.tok_embeddings.weight"])
    assert module.mllm.vision.pos_embed.shape[1] == (96 // 8) ** 2  # re-gridded from 8x8 to 12x12
    out = tmp_path / "sft"
    train(cfg, out)
    rows = read_metrics(out)
    assert len(rows) == 2 and all("loss_sft" in r for r in rows)


def test_frozen_parts_are_not_trained_and_not_counted(tiny_world):
    cfg = cfg_for(tiny_world, "train.freeze_vision=true", "train.freeze_lm=true")
    module = build_stage_module(cfg, 2048, set(), DistEnv(), "single")
    mllm = module.mllm
    assert count_trainable(module) == sum(p.numel() for p in mllm.connector.parameters())


@pytest.mark.parametrize("part", ["vision", "connector", "lm"])
def test_a_run_with_a_frozen_part_takes_the_lr_law_at_the_trainable_count_and_leaves_it_untouched(
    part, pretrain_run, tiny_world, tmp_path
):
    """Starts from the pretrain run, so the frozen part's starting weights are known exactly."""
    out = tmp_path / part
    train(
        cfg_for(
            tiny_world,
            f"train.freeze_{part}=true",
            f"train.init_from={pretrain_run}",
            "train.steps=2",
            "train.warmup_steps=1",
        ),
        out,
    )
    start, _, _ = mm1.train.load_checkpoint(pretrain_run)
    end, _, _ = mm1.train.load_checkpoint(out)
    trainable = sum(p.numel() for name, p in start.named_parameters() if not name.startswith(f"{part}."))
    info = json.loads((out / "run.json").read_text())
    assert info["n_trainable_params"] == trainable and info["lr_source"] == "mm1_law"
    assert info["peak_lr"] == pytest.approx(mm1_lr(trainable), rel=1e-12)
    assert max(r["lr"] for r in read_metrics(out)) == pytest.approx(mm1_lr(trainable), rel=1e-12)
    before, after = start.state_dict(), end.state_dict()
    for name, value in after.items():
        if name.startswith(f"{part}."):
            assert torch.equal(value, before[name]), f"frozen {name} changed"
    moved = [n for n, v in after.items() if not n.startswith(f"{part}.") and not torch.equal(v, before[n])]
    assert len(moved) > 0.9 * sum(not n.startswith(f"{part}.") for n in after), "the other parts did not train"


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_non_finite_loss_is_caught(mode, tiny_world, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = MLLMObjective.forward

    def poisoned(self, batch):
        out = real(self, batch)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss_sum"] = out["loss_sum"] * float("nan")
        return out

    monkeypatch.setattr(MLLMObjective, "forward", poisoned)
    out = tmp_path / mode
    cfg = cfg_for(tiny_world, "train.steps=4", "train.save_every=2", f"train.nonfinite={mode}")
    if mode == "stop":
        with pytest.raises(NonFiniteLoss, match=r"step 3: .*step-2"):
            train(cfg, out)
        assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    else:
        train(cfg, out)
        rows = read_metrics(out)
        assert [r.get("skipped", False) for r in rows] == [False, False, True, False]


@pytest.mark.parametrize(
    "stage, objective",
    [
        ("pretrain", "clip"),
        ("sft", "clip"),
        ("encoder", "clip"),
        ("encoder", "siglip"),
        ("encoder", "aim"),
        ("encoder", "superclass"),
    ],
)
def test_every_stage_objective_returns_one_structure_and_counts_its_units(stage, objective, tiny_world):
    from mm1.data.inputs import resolve_inputs
    from mm1.data.loader import build_loader

    cfg = cfg_for(tiny_world, f"train.stage={stage}", f"train.encoder_objective={objective}")
    inputs = resolve_inputs(cfg)
    cfg.model.image_token_id = inputs.tokenizer.image_id
    torch.manual_seed(0)
    module = build_stage_module(
        cfg, inputs.tokenizer.vocab_size, set(inputs.tokenizer.special_ids), DistEnv(), "single"
    )
    batch = next(iter(build_loader(cfg, inputs)))
    out = module(batch)
    assert {"loss_sum", "metrics"} <= set(out) <= {"loss_sum", "metrics", "aux_loss", "per_source"}
    assert out["loss_sum"].shape == () and out["loss_sum"].requires_grad and torch.isfinite(out["loss_sum"])
    assert all(v.shape == () for v in out["metrics"].values())
    if objective == "superclass":  # a sum over independent captions: one unit per image
        assert module.units(batch) == batch["images"].shape[0] > 1 and "per_source" not in out
    elif stage == "encoder":  # a batch-level loss: one unit per micro-batch
        assert module.units(batch) == 1 and "per_source" not in out
    else:  # a token-level loss: the sum over every target token, and per data kind
        n = int((batch["targets"] != -100).sum())
        assert module.units(batch) == n and out["per_source"][1].sum() == n
        assert float(out["per_source"][0].sum()) == pytest.approx(float(out["loss_sum"].detach()), rel=1e-5)


@pytest.mark.parametrize("stage", ["pretrain", "encoder"])
def test_activation_checkpointing_trains_the_same_weights_as_without(stage, tiny_world, tmp_path):
    """The recomputation in backward ran outside the trainer's CPU SDPA backend (math), so its tensors
    differed from the forward's and torch refused the first step, in fp32 and bf16 alike."""
    runs = {}
    for on in (False, True):
        out = tmp_path / f"ckpt-{on}"
        over = [f"train.stage={stage}", "train.steps=2", f"model.lm.activation_checkpointing={on}"]
        train(cfg_for(tiny_world, *over), out)
        runs[on] = read_checkpoint_weights(out / "checkpoints" / "step-2")
    assert sorted(runs[True]) == sorted(runs[False])
    for k, v in runs[False].items():
        torch.testing.assert_close(runs[True][k], v, rtol=0, atol=1e-5, msg=k)
