"""Tokenizer: reserved ids, `<image>` expansion, decode, HF loading, chat template loss mask."""

from __future__ import annotations

import json
import pickle

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from mm1.data.tokenizer import IM_END, IM_START, IMAGE_TOKEN, Tokenizer

TEXTS = [
    f"a {c} {s} sits at the {p} of the picture, label {i}."
    for i, (c, s, p) in enumerate(
        [(c, s, p) for c in ("red", "green", "blue") for s in ("circle", "square", "star") for p in ("left", "top")]
    )
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.train(TEXTS * 5, 400, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_trained_tokenizer_reserves_ids_0_to_5_and_saves_tokenizer_json(tmp_path) -> None:
    t = Tokenizer.train(TEXTS, 350, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert (t.pad_id, t.bos_id, t.eos_id, t.image_id, t.im_start_id, t.im_end_id) == (0, 1, 2, 3, 4, 5)
    again = Tokenizer.load(tmp_path)
    assert (again.pad_id, again.bos_id, again.eos_id, again.image_id) == (0, 1, 2, 3)
    assert again.vocab_size == t.vocab_size <= 350
    assert again.encode(TEXTS[3]) == t.encode(TEXTS[3])


def test_encode_decode_round_trips_text(tok: Tokenizer) -> None:
    text = "a blue star sits at the top, label 17 (unseen words: zebra!)"
    assert tok.decode(tok.encode(text)) == text


def test_image_marker_expands_to_k_slot_tokens_and_decode_drops_them(tok: Tokenizer) -> None:
    ids = tok.encode("<image> a red circle<image>", tokens_per_image=7, eos=True)
    assert ids[:7] == [tok.image_id] * 7
    assert ids.count(tok.image_id) == 14
    assert ids[-8:-1] == [tok.image_id] * 7 and ids[-1] == tok.eos_id
    assert tok.decode(ids) == " a red circle"
    assert tok.decode(ids + [-100, tok.pad_id]) == " a red circle"


def test_image_marker_without_tokens_per_image_is_an_error(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="tokens_per_image"):
        tok.encode("look: <image>")


def test_chat_loss_mask_covers_only_assistant_content_and_end_marker(tok: Tokenizer) -> None:
    conv = [
        {"from": "human", "value": "<image>\nwhat colour is it?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "and the shape?"},
        {"from": "gpt", "value": "a circle"},
    ]
    ids, mask = tok.chat(conv, tokens_per_image=4)
    assert len(ids) == len(mask)
    learned = [i for i, m in zip(ids, mask) if m]
    red, circle = tok.encode(" red"), tok.encode(" a circle")  # replies are encoded after a space
    assert learned == red + [tok.im_end_id] + circle + [tok.im_end_id]
    text = tok._tok.decode(ids, skip_special_tokens=False)  # the template, markers included
    assert text.startswith(f"{IM_START}user\n{IMAGE_TOKEN * 4}\nwhat colour is it?{IM_END}\n{IM_START}assistant\n red")
    assert text.endswith(f"{IM_START}assistant\n a circle{IM_END}\n")
    assert not any(m for i, m in zip(ids, mask) if i == tok.image_id)


def test_a_reply_s_words_are_the_tokens_they_are_in_a_caption(tok: Tokenizer) -> None:
    # the caption's " red" is the token pre-training ties to red pixels; a reply's first word encoded
    # as "red" would be another token, never seen after an image
    assert tok.encode("red") != tok.encode(" red")
    for reply in ("red", " red"):  # a reply that already starts with a space gets no second one
        ids, mask = tok.chat([{"from": "human", "value": "colour?"}, {"from": "gpt", "value": reply}])
        assert [i for i, m in zip(ids, mask) if m][:-1] == tok.encode("a red circle")[1:2]


def test_chat_generation_prompt_ends_with_open_assistant_header(tok: Tokenizer) -> None:
    ids = tok.chat_prompt("<image>\nDescribe.", tokens_per_image=2)
    assert ids[-len(tok.encode("assistant\n")) - 1 :] == [tok.im_start_id] + tok.encode("assistant\n")


def test_chat_rejects_unknown_roles(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="turn 0"):
        tok.chat([{"from": "robot", "value": "hi"}])


def test_loading_an_hf_dir_adds_missing_special_tokens_and_reads_bos_eos_from_config(tmp_path) -> None:
    vocab = {"<unk>": 0, "<|begin_of_text|>": 1, "<|end_of_text|>": 2, "hello": 3, "world": 4}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|end_of_text|>"})
    )
    t = Tokenizer.load(tmp_path)
    assert (t.bos_id, t.eos_id) == (1, 2)
    assert t.vocab_size == 5 + 3  # <image>, <|im_start|>, <|im_end|> were added
    assert {t.image_id, t.im_start_id, t.im_end_id} == {5, 6, 7}
    assert t.encode("hello <image>", 2, bos=True) == [1, 3, t.image_id, t.image_id]


def test_loading_a_missing_tokenizer_names_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        Tokenizer.load(tmp_path / "nope")


def test_tokenizer_survives_pickling_for_dataloader_workers(tok: Tokenizer) -> None:
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode("<image> blue", 3) == tok.encode("<image> blue", 3)
    assert copy.image_id == tok.image_id


def test_saving_keeps_a_configured_eos_that_its_name_would_not_reveal(tmp_path) -> None:
    vocab = {"<unk>": 0, "<|end_of_text|>": 1, "<|eot_id|>": 2, "hi": 3}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.add_special_tokens(["<|end_of_text|>", "<|eot_id|>"])
    (tmp_path / "src").mkdir()
    hf.save(str(tmp_path / "src" / "tokenizer.json"))
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    t = Tokenizer.load(tmp_path / "src")
    assert t.eos_id == 2
    t.save(tmp_path / "ckpt")
    again = Tokenizer.load(tmp_path / "ckpt")
    assert (again.eos_id, again.image_id, again.vocab_size) == (2, t.image_id, t.vocab_size)
