"""The benchmarks run end to end at tiny shapes and report what they promise (never their speed).

Each benchmark's `main(argv)` is called with the arguments a user would type after
`python benchmarks/X.py`, and its JSON lines are parsed: the fields RESULTS.md quotes must be present and sane, and the
correctness gates (equal loss, equal generated tokens) must have passed for the line to exist.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, capsys: pytest.CaptureFixture[str]) -> list[dict]:
    """`python benchmarks/<script> args...`, in-process (no second interpreter start-up): its JSON lines."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    module = importlib.import_module(script.removesuffix(".py"))
    capsys.readouterr()
    assert module.main(list(args)) == 0
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert lines, f"{script} printed no JSON line:\n{out[-2000:]}"
    return lines


def test_train_step_benchmark_reports_a_time_ratio_after_checking_equal_loss(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = run_bench(
        "train_step.py",
        "--small",
        "--batch",
        "2",
        "--seq-len",
        "96",
        "--images",
        "1",
        "--repeats",
        "2",
        "--warmup",
        "0",
        capsys=capsys,
    )
    last = lines[-1]
    assert last["time_ratio"] > 0 and last["mm1_median_s"] > 0 and last["transformers_median_s"] > 0
    assert abs(last["loss_mm1"] - last["loss_transformers"]) <= 1e-4  # same weights, same batch
    assert {"cpu", "cores", "torch", "date"} <= set(last["machine"])
    assert {line.get("impl") for line in lines[:-1]} == {"mm1", "transformers"}


def test_generate_benchmark_reports_a_speedup_for_identical_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    lines = run_bench(
        "generate.py", "--small", "--batch", "2", "--new-tokens", "6", "--repeats", "1", "--warmup", "0", capsys=capsys
    )
    last = lines[-1]
    assert last["speedup"] > 0 and last["same_tokens"] is True
    assert last["generated_tokens"] > 0 and last["mm1_tokens_per_s"] > 0
    assert last["shape"]["batch"] == 2


def test_gpu_benchmark_runs_every_variant_on_cpu_and_writes_its_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gpu.json"
    lines = run_bench(
        "gpu.py",
        "--tiny",
        "--variants",
        "eager,eager+ckpt,compile",
        "--compile-backend",
        "eager",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--batch",
        "1",
        "--seq-len",
        "96",
        "--images",
        "2",
        "--out",
        str(out),
        "model.lm.n_layers=2",
        "model.vision.depth=2",
        "data.seq_len=96",
        capsys=capsys,
    )
    summary = lines[-1]
    assert summary["bench"] == "gpu_summary" and summary["failed"] == []
    assert summary["ok"] == ["eager", "eager+ckpt", "compile"]
    assert summary["flops_per_step"] > 0 and summary["params"]["total"] > 0
    for record in lines[:-1]:
        assert record["ok"] and record["tokens_per_s"] > 0 and record["images_per_s"] > 0
        assert record["loss_last"] == record["loss_last"]  # finite (NaN != NaN)
    # same seed, same batch: checkpointing and compiling change the speed, not the first loss
    first = {r["variant"]: r["loss_first"] for r in lines[:-1]}
    assert first["eager+ckpt"] == pytest.approx(first["eager"], rel=1e-5)
    assert first["compile"] == pytest.approx(first["eager"], rel=1e-5)
    saved = json.loads(out.read_text())
    assert saved["summary"]["ok"] == summary["ok"] and len(saved["records"]) == 3


def test_gpu_benchmark_reports_a_failing_variant_and_still_runs_the_others(capsys: pytest.CaptureFixture[str]) -> None:
    lines = run_bench(
        "gpu.py",
        "--tiny",
        "--variants",
        "eager,compile",
        "--compile-backend",
        "no-such-backend",
        "--warmup",
        "0",
        "--steps",
        "1",
        "--batch",
        "1",
        "--seq-len",
        "96",
        "--images",
        "1",
        "model.lm.n_layers=1",
        "model.vision.depth=1",
        "data.seq_len=96",
        capsys=capsys,
    )
    by_name = {r["variant"]: r for r in lines[:-1]}
    assert by_name["eager"]["ok"] and not by_name["compile"]["ok"]
    assert "no-such-backend" in by_name["compile"]["error"]
    assert lines[-1]["failed"] == ["compile"] and lines[-1]["best_variant"] == "eager"


def test_packed_benchmark_batches_restart_positions_and_never_target_slots() -> None:
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from gpu import packed_batch

    from mm1.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    b = packed_batch(cfg, 2, 256, 4, torch.device("cpu"))
    slot = cfg.model.image_token_id
    assert int((b["input_ids"] == slot).sum()) == b["images"].shape[0] * cfg.model.tokens_per_image == 2 * 4 * 16
    assert bool((b["targets"][b["input_ids"] == slot] == -100).all())
    assert not bool((b["targets"] == slot).any())
    for row in range(2):
        starts = (b["position_ids"][row] == 0).nonzero().flatten().tolist()
        assert len(starts) == 4 and starts[0] == 0
        doc = b["doc_ids"][row]
        assert all(int(doc[s]) == i for i, s in enumerate(starts))  # a new document at every restart


@pytest.fixture(scope="module")
def single_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dataclasses import replace

    from mm1.data.world import build_world
    from mm1.data.world.build import WORLD_SIZES

    out = tmp_path_factory.mktemp("single") / "world-single"
    build_world(out, replace(WORLD_SIZES["single"], sft=40, eval_images=8), seed=0, workers=1, verbose=False)
    return out


def test_grounding_benchmark_scores_accuracy_prior_and_shuffled(
    single_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = run_bench(
        "grounding.py",
        "--scratch",
        "--steps",
        "2",
        "--world",
        str(single_world),
        "--out",
        str(tmp_path / "run"),
        "--limit",
        "12",
        "model.lm.n_layers=1",
        "model.vision.depth=1",
        capsys=capsys,
    )
    last = lines[-1]
    assert set(last) == {"accuracy", "prior", "shuffled", "steps", "seconds"} and last["steps"] == 2
    assert all(0 <= last[k] <= 100 for k in ("accuracy", "prior", "shuffled")) and last["seconds"] > 0
    info = lines[-2]
    assert set(info["by_type"]) == {"colour", "shape", "yes/no"} and info["n"] == 12
    # 4 questions of each type: each headline figure is the mean of its per-type figures
    for key, headline in (("by_type", "accuracy"), ("by_type_shuffled", "shuffled"), ("by_type_prior", "prior")):
        assert set(info[key]) == {"colour", "shape", "yes/no"}
        assert sum(info[key].values()) / 3 == pytest.approx(last[headline], abs=0.01)


def test_grounding_benchmark_trains_on_the_clock_for_its_time_budget(
    single_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = run_bench(
        "grounding.py",
        "--scratch",
        "--seconds",
        "1.5",
        "--world",
        str(single_world),
        "--out",
        str(tmp_path / "run"),
        "--limit",
        "6",
        "model.lm.n_layers=1",
        "model.vision.depth=1",
        capsys=capsys,
    )
    info, last = lines[-2], lines[-1]
    assert info["budget_s"] == 1.5 and last["steps"] >= 1
    # the clock ended it (the step cap is a million); set-up and the final checkpoint come beside
    assert last["seconds"] < 1.5 + 10
    assert sum(1 for _ in (tmp_path / "run" / "metrics.jsonl").open()) == last["steps"]
    assert (tmp_path / "run" / "checkpoints" / f"step-{last['steps']}").is_dir()


def test_grounding_benchmark_fine_tunes_a_checkpoint_with_that_checkpoints_architecture(
    single_world: Path, tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo pre-trains a conv stem; the tiny preset says patchify. Built from the preset, the SFT
    model did not fit the demo's checkpoint (init refused: missing stem weights); so with any other
    architecture key the checkpoint was trained with. A model.* override still applies on top."""
    from mm1.config import load_config, preset_path
    from mm1.train.trainer import train

    over = [f"data.world={tiny_world}", "train.stage=pretrain", "train.steps=1", "data.batch_size=1"]
    arch = ["model.vision.stem=conv", "model.lm.n_layers=1", "model.vision.depth=1", "model.connector.num_tokens=4"]
    train(load_config(preset_path("tiny"), [*over, *arch]), tmp_path / "pre")
    args = ["--init", str(tmp_path / "pre"), "--steps", "1", "--world", str(single_world)]
    lines = run_bench(
        "grounding.py",
        *args,
        "--out",
        str(tmp_path / "sft"),
        "--limit",
        "6",
        "model.lm.activation_checkpointing=true",
        capsys=capsys,
    )
    assert lines[-1]["steps"] == 1
    model = load_config(tmp_path / "sft" / "config.yaml", []).model
    assert (model.vision.stem, model.lm.n_layers, model.vision.depth, model.connector.num_tokens) == ("conv", 1, 1, 4)
    assert model.lm.activation_checkpointing  # the user's override


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seconds", "0"], "--seconds 0.0 must be > 0"),
        (["--steps", "2", "--limit", "3"], "one image only"),  # 3 questions per image: nothing to shuffle
    ],
)
def test_grounding_benchmark_refuses_what_it_cannot_measure_before_training(
    single_world: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    grounding = importlib.import_module("grounding")
    with pytest.raises(SystemExit, match=message):
        grounding.main(["--scratch", *args, "--world", str(single_world), "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()  # refused before anything was trained or written


def test_probe_benchmark_reports_an_accuracy_and_a_chance_level_per_attribute(
    tiny_world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = run_bench("probe.py", "--world", str(tiny_world), "--images", "120", capsys=capsys)[-1]
    assert set(last) == {"chance", "vit_mean"}
    for table in last.values():
        assert set(table) == {"colour", "shape", "count", "position", "background"}
        assert all(0 <= v <= 100 for v in table.values())


def test_probe_benchmark_on_a_single_world_probes_only_colour_and_shape(
    single_world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = run_bench("probe.py", "--world", str(single_world), capsys=capsys)[-1]
    assert set(last["vit_mean"]) == set(last["chance"]) == {"colour", "shape"}  # one plain background: no probe


@pytest.fixture(scope="module")
def tiny_pretrain(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mm1.config import load_config, preset_path
    from mm1.train.trainer import train

    out = tmp_path_factory.mktemp("attention") / "pre"
    over = [f"data.world={tiny_world}", "train.steps=1", "data.batch_size=1", "model.lm.n_layers=2"]
    train(load_config(preset_path("tiny"), [*over, "model.vision.depth=1"]), out)
    return out


def test_attention_benchmark_splits_each_layers_attention_into_query_image_demo_images_and_text(
    tiny_pretrain: Path, tiny_world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [str(tiny_pretrain), "--world", str(tiny_world), "--shots", "0", "2", "--items", "3", "--prefix", " A"]
    last = run_bench("attention.py", *args, capsys=capsys)[-1]
    assert last["items"] == 3 and set(last["shots"]) == {"0", "2"}
    for shots, layers in last["shots"].items():
        assert [r["layer"] for r in layers] == [0, 1]  # one row per LM layer
        for r in layers:
            assert r["query"] + r["demos"] + r["text"] == pytest.approx(1.0, abs=1e-3)
            assert r["query"] > 0 and r["text"] > 0
            assert (r["demos"] > 0) == (shots == "2")  # zero-shot prompts hold no demonstration image


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("encoder", "checkpoint error: .* is an image-encoder checkpoint"),
        ("missing", "checkpoint error: .*no complete"),
    ],
)
def test_a_benchmark_given_a_wrong_checkpoint_ends_with_one_line_not_a_traceback(
    which: str, message: str, tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mm1.config import load_config, preset_path
    from mm1.train.trainer import train

    run = tmp_path / which
    if which == "encoder":
        over = [f"data.world={tiny_world}", "train.stage=encoder", "train.steps=1", "model.vision.depth=1"]
        train(load_config(preset_path("tiny"), over), run)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    attention = importlib.import_module("attention")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        attention.main([str(run), "--world", str(tiny_world)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_attention_benchmark_refuses_weights_that_do_not_give_the_layers_output(
    tiny_pretrain: Path, tiny_world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attention the recomputation does not describe (here: scores scaled twice) fails loudly."""
    import mm1.models.lm as lm_module

    sys.path.insert(0, str(ROOT / "benchmarks"))
    attention = importlib.import_module("attention")
    plain = lm_module.attend
    monkeypatch.setattr(lm_module, "attend", lambda q, k, v, mask: plain(2 * q, k, v, mask))
    with pytest.raises(AssertionError, match="recomputed weights do not give the layer's output"):
        attention.main([str(tiny_pretrain), "--world", str(tiny_world), "--shots", "1", "--items", "1"])


def test_learnability_benchmark_trains_each_arm_on_the_same_scenes(capsys: pytest.CaptureFixture[str]) -> None:
    last = run_bench(
        "learnability.py",
        "--steps",
        "4",
        "--every",
        "2",
        "--train-images",
        "48",
        "--test-images",
        "24",
        "--arm",
        "model.vision.depth=1",
        "--arm",
        "model.vision.depth=1,model.vision.pos_init_std=0.02",
        capsys=capsys,
    )[-1]
    assert last["attribute"] == "shape" and 0 < last["chance"] <= 100
    arms = last["arms"]
    assert list(arms) == ["model.vision.depth=1", "model.vision.depth=1,model.vision.pos_init_std=0.02"]
    for arm in arms.values():
        assert [c["step"] for c in arm["curve"]] == [2, 4] and arm["accuracy"] == arm["curve"][-1]["accuracy"]
    # same seed, same scenes, different init: the two arms must not train identically
    assert [c["loss"] for c in arms["model.vision.depth=1"]["curve"]] != [
        c["loss"] for c in arms["model.vision.depth=1,model.vision.pos_init_std=0.02"]["curve"]
    ]


def test_world_benchmark_reports_build_seconds_and_the_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    last = run_bench("world.py", "--size", "tiny", "--scale", "0.03", "--workers", "1", capsys=capsys)[-1]
    assert last["seconds"] > 0 and last["size"] == "tinyx0.03"
    assert last["counts"]["caption"] == 90 and set(last["bytes"]) >= {"caption", "eval", "tokenizer.json"}
    assert {"cpu", "cores", "torch", "date"} <= set(last["machine"])


def test_learnability_tiny_scenes_are_labelled_by_their_one_kind() -> None:
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import learnability
    import torch

    from mm1.config import load_config, preset_path
    from mm1.data.world.scenes import SHAPES

    vision = load_config(preset_path("tiny")).model.vision
    x, y = learnability.scenes(vision, "tiny", "shape", "train", 16, seed=0)
    assert x.shape == (16, 3, vision.image_size, vision.image_size) and len(set(y.tolist())) > 3
    for i in range(16):
        png, kind = learnability._scene("tiny", 0, "train", i)
        assert SHAPES.index(kind["shape"]) == int(y[i]) and png[:4] == b"\x89PNG"
    x_test, _ = learnability.scenes(vision, "tiny", "shape", "test", 16, seed=0)
    assert not torch.equal(x, x_test)  # held-out scenes are other scenes


def test_sdpa_cpu_benchmark_times_three_kernels_that_agree(capsys: pytest.CaptureFixture[str]) -> None:
    lines = run_bench("sdpa_cpu.py", "--repeats", "1", "--shapes", "vit_64_tokens", "--dtype", "float32", capsys=capsys)
    assert lines[0]["cpu_flash_min_keys"] > 64 and "cpu" in lines[0]["machine"]
    assert {(line["shape"], line["kernel"]) for line in lines[1:-1]} == {
        ("vit_64_tokens", k) for k in ("math", "flash", "mm1")
    }  # a line per kernel exists only after its gradients matched math's
    speedups = lines[-1]["speedups"]["vit_64_tokens"]
    assert speedups["speedup_vs_math"] > 0 and speedups["speedup_vs_flash"] > 0
