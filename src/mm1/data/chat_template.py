"""The tokenizer's own chat template: an HF Jinja `chat_template`, rendered and cut into learned spans.

An HF LLM comes with the chat format it was tuned on (Llama 3's `<|start_header_id|>user<|end_header_id|>`,
ChatML's `<|im_start|>user`, ...) in tokenizer_config.json's `chat_template` or a `chat_template.jinja`
beside it. Fine-tuning and prompting it in that format, not mm1's, keeps what it already knows.

The template only gives text, so which characters are the assistant's comes from rendering prefixes
of the conversation: for the i-th message, an assistant reply,

    P = render(messages[:i], add_generation_prompt=True)     ... <header of the reply>
    Q = render(messages[:i+1])                                ... <header of the reply> reply<end>\\n

the reply is Q[len(P):] without its trailing whitespace (the end-of-turn marker is learned, the
separator after it is not, as in mm1's own format). This needs a template in which earlier turns render
the same whatever follows; one that rewrites history (e.g. drops reasoning from old replies) is refused.

Content is passed as the string with its `<image>` markers (text-only LLM templates); a template that
drops string content (multimodal ones expect typed parts) gets HF's parts form, an `{"type": "image"}`
per marker and `{"type": "text", ...}` for the text between. Templates are untrusted input: they run in
Jinja's immutable sandbox and get no clock (`strftime_now` is undefined, so dated templates use their
fixed fallback date and a run renders the same text every day).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

IMAGE_MARKER = "<image>"


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    # trim_blocks / lstrip_blocks / loopcontrols / tojson: what HF templates are written against
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = _raise
    return env


def _parts(content: str) -> list[dict[str, str]]:
    """`"<image>\\nWhat is it?"` -> [{"type": "image"}, {"type": "text", "text": "What is it?"}]."""
    out: list[dict[str, str]] = []
    for n, piece in enumerate(content.split(IMAGE_MARKER)):
        if n:
            out.append({"type": "image"})
        if piece.strip():
            out.append({"type": "text", "text": piece.strip()})
    return out


class ChatTemplate:
    """A compiled HF chat template; `spans` gives the rendered text cut into (text, learned) pieces."""

    def __init__(self, source: str, tokens: dict[str, str], where: str) -> None:
        self.source, self.tokens, self.where = source, dict(tokens), where
        self._parts: bool | None = None  # content form, decided by the first conversation rendered
        self._compile()

    def _compile(self) -> None:
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(
                f"{self.where}: chat_template line {e.lineno}: {e.message}; fix the template or "
                "remove it to use mm1's own chat format"
            ) from None

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: compiled templates do not pickle
        return {k: v for k, v in self.__dict__.items() if k != "_template"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._compile()

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The template's text for `messages` ({"role", "content": str with `<image>` markers})."""
        if self._parts is None:
            if self._keeps_content(messages, parts=False):
                self._parts = False
            elif self._keeps_content(messages, parts=True):
                self._parts = True
            else:
                raise ValueError(
                    f"{self.where}: chat_template does not reproduce the conversation's text (neither "
                    "as strings nor as typed parts); remove it to use mm1's own chat format"
                )
        return self._render(messages, add_generation_prompt, self._parts)

    def _render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool, parts: bool) -> str:
        msgs = [{"role": m["role"], "content": _parts(m["content"]) if parts else m["content"]} for m in messages]
        try:
            return self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt, **self.tokens)
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.where}: chat_template failed on this conversation: {e}") from None

    def _keeps_content(self, messages: Sequence[dict[str, str]], parts: bool) -> bool:
        text = self._render(messages, False, parts)
        pieces = [p.strip() for m in messages for p in m["content"].split(IMAGE_MARKER) if p.strip()]
        markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
        return all(p in text for p in pieces) and text.count(IMAGE_MARKER) == markers

    def spans(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The rendered conversation as consecutive (text, learned) pieces; learned = an assistant
        reply and its end-of-turn marker."""
        full = self.render(messages, add_generation_prompt)
        out: list[tuple[str, bool]] = []
        at = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.render(messages[:i], add_generation_prompt=True)
            turn = self.render(messages[: i + 1]).rstrip()
            if not (turn.startswith(head) and full.startswith(turn) and len(head) >= at):
                raise ValueError(
                    f"{self.where}: chat_template renders earlier turns differently once later turns "
                    f"follow (message {i}), so the assistant's tokens cannot be located; remove it "
                    "to use mm1's own chat format"
                )
            out += [(full[at : len(head)], False), (turn[len(head) :], True)]
            at = len(turn)
        out.append((full[at:], False))
        return [(text, learned) for text, learned in out if text]
