"""Checkpoints: exact round trip without pickle, atomic writes, keep-last-N, damage detection."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from mm1.config import TrainConfig
from mm1.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    read_checkpoint_weights,
    read_weights,
    save_checkpoint,
    verify_checkpoint,
)
from mm1.train.distributed import DistEnv
from mm1.train.optim import build_optimizer, build_scheduler, count_trainable, resolve_lr
from mm1.train.state_io import decode, encode

ENV = DistEnv()


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for layer in self.layers:
            h = torch.relu(layer(h)) + h
        return self.out(self.norm(h))


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = Tiny()
    cfg = TrainConfig(steps=20, warmup_steps=3)
    opt = build_optimizer(model, cfg, resolve_lr(cfg, count_trainable(model)))
    return model, opt, build_scheduler(opt, cfg)


def step(model, opt, sched) -> float:
    x = torch.randint(0, 11, (4, 7))  # drawn from the global RNG: a checkpoint must restore it
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    return loss.item()


def save(run: Path, n: int, model, opt, sched, keep_last: int = 0, data=None) -> Path:
    return save_checkpoint(
        run,
        n,
        model,
        opt,
        sched,
        env=ENV,
        trainer_state={"note": "x"},
        rank_state={"data": data or {"pos": n}},
        keep_last=keep_last,
    )


def test_resuming_a_checkpoint_continues_the_exact_trajectory(tmp_path, monkeypatch):
    model, opt, sched = make()
    for _ in range(3):
        step(model, opt, sched)
    ckpt = save(tmp_path, 3, model, opt, sched, data={"cursor": (1, 2, 3), "pending": [[4, 0]]})
    expected = [step(model, opt, sched) for _ in range(4)]

    def no_pickle(*a, **k):
        raise AssertionError("a checkpoint load must not unpickle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    model2, opt2, sched2 = make(seed=123)  # different init and RNG: everything must come from the checkpoint
    torch.manual_seed(999)
    trainer, rank = load_training_state(ckpt, model2, opt2, sched2, ENV)
    assert trainer["step"] == 3 and trainer["note"] == "x"
    assert rank["data"] == {"cursor": (1, 2, 3), "pending": [[4, 0]]}
    assert [step(model2, opt2, sched2) for _ in range(4)] == expected
    assert model2.out.weight is model2.emb.weight  # tying survives the alias-aware weight file


def test_checkpoint_files_are_safetensors_json_and_checksummed(tmp_path):
    model, opt, sched = make()
    step(model, opt, sched)
    ckpt = save_checkpoint(
        tmp_path, 1, model, opt, sched, env=ENV, trainer_state={}, rank_state={"data": {}}, consolidated=True
    )
    names = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}
    assert all(n.endswith((".json", ".safetensors", ".yaml")) for n in names)
    assert any(n.startswith("model/") for n in names) and any(n.startswith("optim/") for n in names)
    sums = json.loads((ckpt / "checksums.json").read_text())
    assert set(sums) == names - {"checksums.json"}
    consolidated = read_weights(ckpt / "model.safetensors")  # asked for: the whole weights in one file
    assert torch.equal(consolidated["out.weight"], model.emb.weight.detach())
    sharded = read_checkpoint_weights(ckpt)
    (ckpt / "model.safetensors").unlink()
    assert torch.equal(read_checkpoint_weights(ckpt)["emb.weight"], sharded["emb.weight"])
    assert torch.equal(sharded["emb.weight"], model.emb.weight.detach())


@pytest.mark.parametrize(
    "victim", ["model/shard-00001-model-00001-of-00001.safetensors", "optimizer.json", "rank-0.safetensors"]
)
def test_a_flipped_byte_is_refused_with_a_message_naming_the_file(tmp_path, victim):
    model, opt, sched = make()
    step(model, opt, sched)
    ckpt = save(tmp_path, 1, model, opt, sched)
    data = bytearray((ckpt / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (ckpt / victim).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        verify_checkpoint(ckpt)
    before = model.layers[0].weight.detach().clone()
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        load_training_state(ckpt, model, opt, sched, ENV)
    assert torch.equal(model.layers[0].weight, before)  # nothing was loaded


def test_keep_last_n_and_latest_ignore_unfinished_saves(tmp_path):
    model, opt, sched = make()
    for n in (1, 2, 3, 4):
        step(model, opt, sched)
        save(tmp_path, n, model, opt, sched, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-3", "step-4"]
    # a save killed mid-write leaves only a temp dir (never a step-N), and is not picked for resume
    (tmp_path / "checkpoints" / ".tmp-step-5").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step-5" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step-4"
    save(tmp_path, 6, model, opt, sched, keep_last=2)
    assert not (tmp_path / "checkpoints" / ".tmp-step-5").exists()
    assert latest_checkpoint(tmp_path).name == "step-6"


def test_state_codec_keeps_types_that_json_alone_would_lose():
    import numpy as np

    state = {
        "ids": {0: torch.arange(3), 7: "x"},
        "t": (1, 2.5, None),
        "np": np.arange(4, dtype=np.uint32),
        "nested": [{"a": True}],
    }
    tensors: dict = {}
    tree = json.loads(json.dumps(encode(state, tensors)))
    back = decode(tree, tensors)
    assert list(back["ids"]) == [0, 7] and torch.equal(back["ids"][0], torch.arange(3))
    assert back["t"] == (1, 2.5, None) and back["nested"] == [{"a": True}]
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2, 3]
    with pytest.raises(TypeError, match="plain data"):
        encode({"f": object()}, {})
