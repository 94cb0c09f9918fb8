"""`mm1 export --format hf`: transformers computes what mm1 computes, for every connector.

Each case builds a tiny random mm1 model, saves it as a checkpoint, exports it, loads the folder with
transformers (plain LLaVA without remote code for `mlp`, mm1's modeling file otherwise) and compares
logits (< 1e-4), greedy tokens (equal to mm1's generation), the processor's input ids and pixels.
transformers is slow to import, so the exports are made once per module.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from references import require  # tests/references.py: skip here, fail under `make test`

require("transformers", module_level=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mm1.cli import main  # noqa: E402
from mm1.config import Config, ConnectorConfig, LMConfig, ModelConfig, VisionConfig, to_yaml  # noqa: E402
from mm1.data.tokenizer import Tokenizer  # noqa: E402
from mm1.eval.generate import GenerationConfig, encode_prompt, generate_ids, image_batch  # noqa: E402
from mm1.export.hf_layout import ExportError, plan  # noqa: E402
from mm1.models.build import build_model  # noqa: E402
from mm1.train.checkpoint import save_checkpoint  # noqa: E402
from mm1.train.distributed import DistEnv  # noqa: E402

TEXTS = [
    "a red circle above a blue square",
    "two green triangles on the left",
    "the label reads A7",
    "Question: what colour is the circle? Short answer: red",
] * 20
CLIP_LIKE = dict(use_cls=True, pre_norm=True, post_norm=False, feature_layer=-2, act="quick_gelu")
CASES = {  # name -> (connector, vision overrides)
    "mlp_clip": (ConnectorConfig(kind="mlp", num_tokens=16), CLIP_LIKE),
    "mlp_siglip": (ConnectorConfig(kind="mlp", num_tokens=16), dict(post_norm=False, act="gelu_tanh")),
    "mlp_postnorm": (ConnectorConfig(kind="mlp", num_tokens=16), {}),
    "c_abstractor": (ConnectorConfig(kind="c_abstractor", num_tokens=4, depth=1, out_norm=1.0), {}),
    "avgpool": (ConnectorConfig(kind="avgpool", num_tokens=4), CLIP_LIKE),
    "attnpool": (ConnectorConfig(kind="attnpool", num_tokens=4, heads=2), {}),
    "mlp_moe": (ConnectorConfig(kind="mlp", num_tokens=16), CLIP_LIKE),  # MoE LM (tiny_config): Qwen2-MoE
}
PROMPT = "<image>the label reads"


def tiny_config(tok: Tokenizer, connector: ConnectorConfig, vision: dict, moe: bool = False) -> Config:
    v = VisionConfig(image_size=32, patch_size=8, width=32, depth=3, heads=2, mlp_dim=64, **vision)
    lm = LMConfig(
        vocab_size=tok.vocab_size,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=128,
        max_seq_len=128,
        rope_theta=5000.0,
        **(dict(n_experts=4, moe_every=2, moe_top_k=2) if moe else {}),
    )
    cfg = Config(model=ModelConfig(vision=v, connector=connector, lm=lm, image_token_id=tok.image_id))
    cfg.data.seq_len = 64
    return cfg


def write_checkpoint(run: Path, cfg: Config, tok: Tokenizer, seed: int) -> None:
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():  # random weights large enough that greedy picks are far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def extra(d: Path) -> None:
        (d / "config.yaml").write_text(to_yaml(cfg))
        tok.save(d / "tokenizer.json")

    save_checkpoint(run, 1, model, opt, sched, env=DistEnv(), trainer_state={}, rank_state={}, extra=extra)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (run dir, export folder), made through the CLI."""
    root = tmp_path_factory.mktemp("export")
    tok = Tokenizer.train(TEXTS, 300, root / "tokenizer.json")
    out = {}
    for n, (name, (connector, vision)) in enumerate(CASES.items()):
        run, folder = root / f"run-{name}", root / f"hf-{name}"
        write_checkpoint(run, tiny_config(tok, connector, vision, moe=name.endswith("moe")), tok, seed=n)
        assert main(["export", str(run), str(folder), "--format", "hf"]) == 0
        out[name] = (run, folder)
    return out


def make_image() -> Image.Image:
    img = Image.new("RGB", (48, 48))
    img.putdata([((x * 5) % 256, (y * 7) % 256, (x * y) % 256) for y in range(48) for x in range(48)])
    return img


def load_hf(folder: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    remote = (folder / "modeling_mm1_llava.py").is_file()
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=remote).eval()
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=remote)


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_computes_what_mm1_computes(exported, name):
    from mm1.train import load_checkpoint

    run, folder = exported[name]
    model, cfg, tok = load_checkpoint(run)
    hf, processor = load_hf(folder)
    plain = (folder / "modeling_mm1_llava.py").is_file() is False
    assert plain == (name in ("mlp_clip", "mlp_siglip", "mlp_moe"))
    if plain:
        assert type(hf).__name__ == "LlavaForConditionalGeneration"
    image = make_image()
    inputs = processor(images=[image], text=PROMPT, return_tensors="pt")
    ids = encode_prompt(tok, PROMPT, cfg.model.tokens_per_image)
    assert inputs["input_ids"][0].tolist() == ids  # slot token and count, text tokens
    pixels = image_batch(cfg.model, [image])
    assert (inputs["pixel_values"] - pixels).abs().max() < 1e-5  # same resize (bicubic) and normalisation
    with torch.no_grad():
        ours = model(torch.tensor([ids]), pixels).logits
        theirs = hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4
    new = generate_ids(
        model, tok, [PROMPT], [[image]], GenerationConfig(max_new_tokens=10, stop=[], stop_ids=[tok.im_end_id])
    )[0]
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor([ids]),
            pixel_values=pixels,
            attention_mask=torch.ones(1, len(ids)),
            max_new_tokens=10,
            do_sample=False,
        )[0, len(ids) :].tolist()
    while out and out[-1] in (tok.eos_id, tok.im_end_id):
        out.pop()  # transformers returns the ending token, mm1 drops it
    assert out == new and len(new) > 0


def test_chat_template_tokenises_like_mm1(exported):
    from transformers import AutoProcessor, AutoTokenizer

    _, folder = exported["mlp_clip"]
    hf_tok = AutoTokenizer.from_pretrained(folder)
    tok = Tokenizer.load(folder)
    turns = [
        {"role": "user", "content": "<image>\nwhat colour?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and the shape?"},
    ]
    text = hf_tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert AutoProcessor.from_pretrained(folder).chat_template == hf_tok.chat_template  # the processor has it too
    ours, _ = tok.chat(turns, 1, add_generation_prompt=True)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}]
    text = hf_tok.apply_chat_template(parts, tokenize=False, add_generation_prompt=True)
    assert (
        hf_tok(text, add_special_tokens=False)["input_ids"]
        == tok.chat([{"role": "user", "content": "<image>\nwhat colour?"}], 1, add_generation_prompt=True)[0]
    )


def test_readme_loading_example_runs(exported, tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in readme.split("```python")[1:] if "AutoModelForImageTextToText" in b).split("```")[0]
    (tmp_path / "exported").symlink_to(exported["mlp_clip"][1])
    make_image().save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 (our own README)
    assert capsys.readouterr().out.startswith("A short description:")


def test_unexportable_models_are_refused_with_the_reason():
    with pytest.raises(ExportError, match="subimage_grid"):
        plan(ModelConfig(subimage_grid=2))
    with pytest.raises(ExportError, match="no vision tower with this combination"):
        plan(ModelConfig(vision=VisionConfig(use_cls=True, pre_norm=False)))
    with pytest.raises(ExportError, match="stem='conv'.*train with model.vision.stem=patch"):
        plan(ModelConfig(vision=VisionConfig(stem="conv")))


def test_export_refuses_to_overwrite(exported, capsys):
    run, folder = exported["mlp_clip"]
    assert main(["export", str(run), str(folder)]) == 2
    assert "already exists" in capsys.readouterr().err
