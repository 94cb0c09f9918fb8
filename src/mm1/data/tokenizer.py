"""The text side of every sequence: HF `tokenizers` + the conventions mm1 needs on top of it.

A multimodal sequence needs a few things a plain LLM tokenizer does not give: an image-slot token
that the literal `<image>` expands into k copies of (k = connector tokens x crops), chat markers
for SFT with a loss mask that covers only what the assistant says, and a decode that hides slots.
Any `tokenizer.json` (e.g. a Llama / Qwen2 / SmolLM dir) is accepted and the missing special tokens
are added; when the dir carries its own chat template (tokenizer_config.json `chat_template`, or
chat_template.jinja) SFT and chat prompts use it (`mm1.data.chat_template`), otherwise mm1's
`<|im_start|>role\ncontent<|im_end|>\n`. The synthetic world trains its own byte-level BPE with ids 0-5
reserved.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mm1.data.chat_template import ChatTemplate

IMAGE_TOKEN = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
RESERVED = ("<pad>", "<s>", "</s>", IMAGE_TOKEN, IM_START, IM_END)  # ids 0-5 of a trained tokenizer

# Names HF tokenizers use for BOS / EOS / PAD when tokenizer_config.json does not say.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[BOS]")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]")
_PAD_NAMES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "[PAD]", "<unk>")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _message(n: int, turn: dict[str, str]) -> dict[str, str]:
    """A LLaVA turn or a role/content message -> {"role": user|assistant|system, "content": str}."""
    role = _ROLES.get(str(turn.get("from", turn.get("role"))).lower())
    content = turn.get("value", turn.get("content"))
    if role is None or not isinstance(content, str):
        raise ValueError(
            f"conversation turn {n}: expected from=human|gpt (or role=user|assistant|system) and a "
            f"string value, got {turn!r}"
        )
    return {"role": role, "content": content}


def _chat_template(folder: Path, configured: Any) -> str | None:
    """The folder's chat template: chat_template.jinja, else tokenizer_config.json's `chat_template`
    (a string, or HF's list of named templates, of which mm1 takes "default")."""
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if isinstance(configured, list):
        named = {t.get("name"): t.get("template") for t in configured if isinstance(t, dict)}
        configured = named.get("default")
    return configured if isinstance(configured, str) and configured.strip() else None


def _token_name(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def reply_text(content: str) -> str:
    """An assistant reply as mm1's chat format encodes it: after a space, unless it starts with one.

    A byte-level BPE without a prefix space gives a word another token at the start of a text ("blue")
    than after a space (" blue", as in every caption and "Short answer: blue"), so a reply encoded
    as it stands asks for tokens that pre-training never tied to an image: the pre-trained model
    answered chat questions from the SFT set's priors while it read the same images after "Short
    answer:", and SFT had to teach reading again on new tokens (docs/grounding.md section 23)."""
    return content if not content or content[0].isspace() else " " + content


class Tokenizer:
    """A `tokenizers.Tokenizer` plus mm1's special ids, `<image>` expansion and chat template."""

    def __init__(self, tok: HFTokenizer, config: dict[str, Any] | None = None, source: str = "") -> None:
        self._tok = tok
        self.source = source
        config = config or {}
        missing = [t for t in (IMAGE_TOKEN, IM_START, IM_END) if tok.token_to_id(t) is None]
        if missing:
            tok.add_special_tokens(missing)
        self.image_id = self._id(IMAGE_TOKEN)
        self.im_start_id = self._id(IM_START)
        self.im_end_id = self._id(IM_END)
        eos = self._find(config.get("eos_token"), _EOS_NAMES)
        if eos is None:  # a tokenizer with no end-of-sequence token: give it one
            tok.add_special_tokens(["</s>"])
            eos = "</s>"
        self.eos_id = self._id(eos)
        bos = self._find(config.get("bos_token"), _BOS_NAMES)
        self.bos_id = self._id(bos) if bos is not None else self.eos_id  # Qwen2-style: no BOS
        pad = self._find(config.get("pad_token"), _PAD_NAMES)
        self.pad_id = self._id(pad) if pad is not None else self.eos_id  # pad is never a target
        self.special_ids = frozenset(
            {self.image_id, self.im_start_id, self.im_end_id, self.eos_id, self.bos_id, self.pad_id}
        )
        template = config.get("chat_template")
        names = {k: n for k, v in config.items() if k.endswith("_token") and (n := _token_name(v)) is not None}
        self.template = ChatTemplate(template, names, source or "tokenizer") if isinstance(template, str) else None
        self._turn_end_id: int | None = None

    # ------------------------------------------------------------------ construction

    def _id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer {self.source or '?'} has no token {token!r}")
        return i

    def _find(self, configured: Any, names: Sequence[str]) -> str | None:
        name = _token_name(configured)
        if name is not None and self._tok.token_to_id(name) is not None:
            return name
        return next((n for n in names if self._tok.token_to_id(n) is not None), None)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer.json, or an HF model dir holding one (plus tokenizer_config.json)."""
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer at {p}: expected a tokenizer.json file or a model dir containing one "
                "(set data.tokenizer, or build the synthetic world with `mm1 world`)"
            )
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{file}: not a valid HF tokenizers file ({e})") from None
        config: dict[str, Any] = {}
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_file}: invalid JSON ({e}); fix or delete it") from None
        config["chat_template"] = _chat_template(file.parent, config.get("chat_template"))
        return cls(tok, config, source=str(file))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, path: str | os.PathLike[str]) -> Tokenizer:
        """Train a byte-level BPE on `texts` (ids 0-5 = RESERVED) and save it as tokenizer.json.

        `path` is the file to write, or a directory to write `tokenizer.json` into.
        """
        if vocab_size < len(RESERVED) + 256:
            raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least {len(RESERVED) + 256}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(RESERVED),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        out = cls(tok, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, source=str(path))
        assert (out.pad_id, out.bos_id, out.eos_id, out.image_id, out.im_start_id, out.im_end_id) == (0, 1, 2, 3, 4, 5)
        out.save(path)
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write tokenizer.json (to `path`, or into it when it is a directory); returns the file."""
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() or p.suffix != ".json" else p
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".json.tmp")
        self._tok.save(str(tmp))
        os.replace(tmp, file)
        # BOS/EOS/PAD that loading would not find by their usual names (e.g. Llama 3's <|eot_id|> as
        # EOS) are kept in a tokenizer_config.json beside it, as HF does, and so are the token names a
        # chat template renders (its `bos_token`); the usual case writes none
        guessed = Tokenizer(HFTokenizer.from_str(self._tok.to_str()))
        if (guessed.bos_id, guessed.eos_id, guessed.pad_id) != (self.bos_id, self.eos_id, self.pad_id) or self.template:
            names = {
                k: self._tok.id_to_token(i)
                for k, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id))
            }
            names.update(self.template.tokens if self.template else {})
            (file.parent / "tokenizer_config.json").write_text(json.dumps(names, indent=1) + "\n")
        if self.template is not None:  # HF's own file for it, read back by load() before tokenizer_config.json
            (file.parent / CHAT_TEMPLATE_FILE).write_text(self.template.source, encoding="utf-8")
        return file

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers get a copy via pickle
        state = self.__dict__.copy()
        state["_tok"] = self._tok.to_str()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["_tok"] = HFTokenizer.from_str(state["_tok"])
        self.__dict__.update(state)

    # ------------------------------------------------------------------ encode / decode

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(
        self, text: str, tokens_per_image: int | None = None, *, bos: bool = False, eos: bool = False
    ) -> list[int]:
        """Token ids of `text`; each literal `<image>` becomes `tokens_per_image` copies of `image_id`."""
        pieces = text.split(IMAGE_TOKEN)
        if len(pieces) > 1 and not tokens_per_image:
            raise ValueError(
                f"text contains {len(pieces) - 1} {IMAGE_TOKEN} marker(s) but tokens_per_image was not given; "
                "pass cfg.model.tokens_per_image"
            )
        ids = [self.bos_id] if bos else []
        for i, piece in enumerate(pieces):
            if i:
                ids.extend([self.image_id] * int(tokens_per_image or 0))
            if piece:
                ids.extend(self._tok.encode(piece, add_special_tokens=False).ids)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` without image slots, padding, ignored targets (-100) or special tokens."""
        keep = [int(i) for i in ids if int(i) >= 0 and int(i) not in self.special_ids]
        return self._tok.decode(keep, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    # ------------------------------------------------------------------ chat template (SFT)

    def chat(
        self,
        conversations: Sequence[dict[str, str]],
        tokens_per_image: int | None = None,
        add_generation_prompt: bool = False,
    ) -> tuple[list[int], list[bool]]:
        """Ids and loss mask of the conversation in the tokenizer's own chat template, or else in
        mm1's `<|im_start|>role\\ncontent<|im_end|>\\n` turns, an assistant's content encoded after a
        space (`reply_text`).

        `conversations` are LLaVA turns (`{"from": "human"|"gpt", "value": ...}`) or
        `{"role": "user"|"assistant"|"system", "content": ...}`. mask[t] is True where token t is to
        be predicted: the assistant's content and its end-of-turn marker, never the role header, the
        user's turn or the separator after the end marker. `add_generation_prompt` appends an open
        assistant header (inference).
        """
        messages = [_message(n, turn) for n, turn in enumerate(conversations)]
        if self.template is not None:
            return self._chat_from_template(messages, tokens_per_image, add_generation_prompt)
        ids: list[int] = []
        mask: list[bool] = []
        for message in messages:
            role, content = message["role"], message["content"]
            header = [self.im_start_id] + self.encode(f"{role}\n")
            text = reply_text(content) if role == "assistant" else content
            body = self.encode(text, tokens_per_image) + [self.im_end_id]
            tail = self.encode("\n")
            learn = role == "assistant"
            ids += header + body + tail
            mask += [False] * len(header) + [learn and t != self.image_id for t in body] + [False] * len(tail)
        if add_generation_prompt:
            header = [self.im_start_id] + self.encode("assistant\n")
            ids += header
            mask += [False] * len(header)
        return ids, mask

    def _chat_from_template(
        self, messages: list[dict[str, str]], tokens_per_image: int | None, add_generation_prompt: bool
    ) -> tuple[list[int], list[bool]]:
        """Each piece of the rendered template encoded on its own, so a reply's first token starts
        where generation starts after the open assistant header."""
        assert self.template is not None
        ids: list[int] = []
        mask: list[bool] = []
        for text, learned in self.template.spans(messages, add_generation_prompt):
            piece = self.encode(text, tokens_per_image)
            ids += piece
            mask += [learned and t != self.image_id for t in piece]
        return ids, mask

    @property
    def turn_end_id(self) -> int:
        """The token that ends an assistant reply: `<|im_end|>`, or the template's own (e.g. Llama 3's
        `<|eot_id|>`: the last token of a reply it renders, when that is a special token; else EOS)."""
        if self.template is None:
            return self.im_end_id
        if self._turn_end_id is None:
            probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "a"}]
            last = self.encode(next(text for text, learned in self.template.spans(probe) if learned))[-1]
            added = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
            self._turn_end_id = last if last in added else self.eos_id
        return self._turn_end_id

    def chat_prompt(self, user: str, tokens_per_image: int | None = None) -> list[int]:
        """Ids of a single user turn followed by an open assistant header, for generation."""
        ids, _ = self.chat([{"role": "user", "content": user}], tokens_per_image, add_generation_prompt=True)
        return ids
