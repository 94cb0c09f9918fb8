"""A tokenizer's own chat template (HF `chat_template`): SFT, generation and eval prompts use it; the
loss covers only what the assistant says; templates that hide the turns are refused in one line."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mm1.config import load_config
from mm1.data.kinds import get_kind
from mm1.data.sequence import DocBuilder, collate
from mm1.data.tokenizer import Tokenizer
from mm1.eval.generate import encode_prompt
from mm1.export.hf_files import CHAT_TEMPLATE, chat_template

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama-3-shaped: BOS, a header per turn, the content trimmed, <|eot_id|> ends every turn
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# LLaVA-1.5-shaped: content is a list of typed parts, every image first
PARTS_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)
CONV = [
    {"from": "human", "value": "<image>\nwhat colour is the star?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "and its shape?"},
    {"from": "gpt", "value": "a small circle"},
]
WORDS = "what colour is the star red and its shape a small circle blue square left right top user assistant"


def hf_dir(root: Path, template: str | None, *, as_file: bool = False) -> Path:
    """A tiny local HF tokenizer dir: byte-level BPE + Llama-3 special tokens + tokenizer_config.json."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [WORDS] * 20,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    if template is not None and as_file:
        (root / "chat_template.jinja").write_text(template)
    elif template is not None:
        config["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.load(hf_dir(tmp_path_factory.mktemp("llama3"), LLAMA3_TEMPLATE))


def learned_text(tok: Tokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    """The learned tokens as runs of text, special tokens spelled out."""
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs, run = runs + [tok._tok.decode(run, skip_special_tokens=False)], []
    return runs + ([tok._tok.decode(run, skip_special_tokens=False)] if run else [])


def test_the_tokenizers_own_template_renders_the_prompt_and_trains_only_the_replies(llama: Tokenizer) -> None:
    ids, mask = llama.chat(CONV, tokens_per_image=3)
    expected = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nwhat colour is the star?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nand its shape?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na small circle<|eot_id|>"
    )
    assert llama.template is not None
    assert (
        llama.template.render(
            [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * 2, [t["value"] for t in CONV])]
        )
        == expected
    )
    assert ids == llama.encode(expected, tokens_per_image=3)  # mm1's <|im_start|> never appears
    assert ids[0] == llama.bos_id and ids.count(llama.image_id) == 3 and llama.im_start_id not in ids
    assert learned_text(llama, ids, mask) == ["red<|eot_id|>", "a small circle<|eot_id|>"]
    assert not any(m for i, m in zip(ids, mask) if i == llama.image_id)


def test_sft_documents_use_the_template_and_their_targets_are_the_replies(llama: Tokenizer) -> None:
    b = DocBuilder(llama, lambda raw, where: [torch.zeros(3, 2, 2)], 128, 4, 3)
    (doc,) = get_kind("sft").to_docs(b, NS(key="k", where="w", images=[b"x"], conversations=CONV))
    batch = collate([[doc]], 128, llama.pad_id, llama.image_id, [3])
    targets = batch["targets"][0][batch["targets"][0] != -100].tolist()
    eot = llama.token_to_id("<|eot_id|>")
    assert targets == llama.encode("red") + [eot] + llama.encode("a small circle") + [eot]


def test_generation_and_eval_prompts_end_with_the_templates_open_assistant_header(llama: Tokenizer) -> None:
    turns = [{"role": "user", "content": "<image>\nwhat colour is the star?"}]
    text = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nwhat colour is the star?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert encode_prompt(llama, turns, 2) == llama.encode(text, 2)
    assert encode_prompt(llama, turns, 2, add_bos=True) == llama.encode(text, 2)  # BOS once, not twice
    assert llama.turn_end_id == llama.token_to_id("<|eot_id|>")  # eval.chat stops generation there
    # a few-shot chat prompt: the demonstration's reply sits where training put replies
    demo = [turns[0], {"role": "assistant", "content": "red"}, {"role": "user", "content": "and its shape?"}]
    ids = encode_prompt(llama, demo, 2)
    trained, _ = llama.chat(demo[:2], 2)
    assert (
        ids[: len(trained)] == trained
        and ids[-3:] == llama.encode("<|start_header_id|>assistant<|end_header_id|>\n\n")[-3:]
    )


def test_a_tokenizer_without_a_template_keeps_mm1s_format(tmp_path: Path) -> None:
    tok = Tokenizer.load(hf_dir(tmp_path, None))
    ids, mask = tok.chat(CONV, tokens_per_image=1)
    assert tok.template is None and tok.turn_end_id == tok.im_end_id
    assert ids[0] == tok.im_start_id and learned_text(tok, ids, mask) == [" red<|im_end|>", " a small circle<|im_end|>"]


def test_mm1s_own_format_written_as_a_template_gives_mm1s_ids_and_mask(tmp_path: Path) -> None:
    plain = Tokenizer.load(hf_dir(tmp_path / "plain", None))
    templated = Tokenizer.load(hf_dir(tmp_path / "exported", CHAT_TEMPLATE))  # what `mm1 export` writes
    for generation in (False, True):
        assert templated.chat(CONV, 2, generation) == plain.chat(CONV, 2, generation)


def test_the_template_travels_with_the_tokenizer(tmp_path: Path, llama: Tokenizer) -> None:
    again = Tokenizer.load(hf_dir(tmp_path / "file", LLAMA3_TEMPLATE, as_file=True))  # chat_template.jinja
    assert again.chat(CONV, 1) == llama.chat(CONV, 1)
    again.save(tmp_path / "ckpt")  # a checkpoint's copy
    assert Tokenizer.load(tmp_path / "ckpt").chat(CONV, 1) == llama.chat(CONV, 1)
    assert pickle.loads(pickle.dumps(llama)).chat(CONV, 1) == llama.chat(CONV, 1)  # DataLoader workers


def test_a_multimodal_template_gets_typed_parts(tmp_path: Path) -> None:
    tok = Tokenizer.load(hf_dir(tmp_path, PARTS_TEMPLATE))
    ids, mask = tok.chat(CONV, tokens_per_image=2)
    assert (
        tok.template is not None
        and tok.template.render([{"role": "user", "content": "<image>\nwhat?"}], True)
        == "USER: <image>\nwhat?\nASSISTANT: "
    )
    assert ids.count(tok.image_id) == 2
    assert learned_text(tok, ids, mask) == ["red<|end_of_text|>", "a small circle<|end_of_text|>"]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
            "{% if loop.last %}.{% endif %}{{ '\\n' }}{% endfor %}",
            "renders earlier turns differently",
        ),  # the last turn is written differently from the same turn earlier
        ("{% for m in messages %}{{ m['role'] }}\n{% endfor %}", "does not reproduce the conversation's text"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "chat_template failed"),  # the sandbox holds
        ("{% for m in messages %}{{ m['content'] }", "chat_template line 1"),
    ],
)
def test_a_template_that_hides_the_turns_is_refused_naming_the_file(
    tmp_path: Path, template: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as err:
        Tokenizer.load(hf_dir(tmp_path, template)).chat(CONV, 1)
    assert str(tmp_path / "tokenizer.json") in str(err.value) and "\n" not in str(err.value)


def test_an_export_carries_the_template_the_model_was_tuned_with(tmp_path: Path, llama: Tokenizer) -> None:
    cfg = load_config("configs/tiny.yaml")
    assert chat_template(cfg, llama) == LLAMA3_TEMPLATE
    assert chat_template(cfg, Tokenizer.load(hf_dir(tmp_path, None))) == CHAT_TEMPLATE.replace(
        "{% if add_bos %}{{ bos_token }}{% endif %}", ""
    )  # mm1's own, without BOS (eval.add_bos=false)
