"""Instruction-tuning examples (task `sft`): conversations → token ids with only the assistant's turns learned.

A training row is either a prompt/response pair or a whole conversation (`DataConfig.messages_column`): a list of
messages `{"role": ..., "content": ...}` (ShareGPT's `{"from": "human" | "gpt", "value": ...}` is read too). Each
row becomes a list of segments `(text, learned)`: with the tokenizer's chat template, the text between one rendered
prefix of the conversation and the next, where the prefixes end before each assistant turn (rendered with the
generation prompt) and after it; every assistant turn, with the template's end-of-turn marker, is learned and
everything else (system prompt, user turns, turn headers) is masked. Without a template the segments are
`content + "\\n"` for other roles and `content` + EOS for the assistant, after the tokenizer's BOS if it uses one.

Segments are tokenized apart, so a mask boundary never falls inside a token and a prompt gets the same ids as at
generation (`lorafa generate` renders it with the generation prompt, alone).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

IGNORE_INDEX = -100
"""Label value that Hugging Face losses skip."""

CONVERSATION_COLUMNS = ("messages", "conversations")
"""Columns read as conversations when `messages_column` is unset and the data has no `prompt_column`."""

_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}

Message = dict[str, str]
Segment = tuple[str, bool]
"""(text, learned): a piece of a rendered conversation and whether its tokens are trained on."""


def conversation(value: Any) -> list[Message]:
    """One row's conversation as [{"role", "content"}, ...], from role/content or ShareGPT from/value messages.

    A string is parsed as JSON first (a CSV cell holding a conversation). Roles `human` and `gpt` become `user`
    and `assistant`; other roles pass through unchanged (only `assistant` turns are learned). A content given as
    text parts (`[{"type": "text", "text": ...}, ...]`) is joined into one string.

    Raises:
        ValueError: not a list of messages, a message without role/content strings, or no messages at all.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"a string that is not a JSON list of messages ({e.msg})") from None
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"expected a non-empty list of messages, got {_short(value)}")
    out: list[Message] = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"message {k} is {_short(m)}, not an object with role and content")
        role = m.get("role") if m.get("role") is not None else m.get("from")
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" for p in content
        ):
            content = "".join(str(p.get("text", "")) for p in content)  # OpenAI-style text parts
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise ValueError(
                f"message {k} needs a role (or from) and a content (or value) string, got {_short(m)}"
            )
        out.append({"role": _SHAREGPT_ROLES.get(role, role), "content": content})
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pair(prompt: str, response: str) -> list[Message]:
    """A prompt/response row as a one-turn conversation."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def chat_segments(tokenizer: Any, messages: list[Message]) -> list[Segment]:
    """Split the chat-template rendering of `messages` into masked and learned pieces (see the module doc).

    Raises:
        ValueError: the template fails on the conversation, or renders an earlier part of it differently once
            more turns follow (its prefixes do not nest), so the turns cannot be told apart.
    """

    def render(upto: int, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # jinja2 TemplateError, or a template's own raise_exception
            raise ValueError(
                f"use_chat_template: the tokenizer's chat template fails on the conversation "
                f"{_short(messages)}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None

    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = render(i, True) if i > 0 else _empty_head(tokenizer, render)
        full = render(i + 1, False)
        if not head.startswith(done) or not full.startswith(head):
            raise ValueError(
                "use_chat_template: this tokenizer's chat template renders the prompt differently with and "
                f"without the answer (assistant turn {i} of {_short(messages)}), so the prompt cannot be masked; "
                "set use_chat_template: false"
            )
        segments += [(head[len(done) :], False), (full[len(head) :], True)]
        done = full
    if messages[-1]["role"] != "assistant" or not segments:
        whole = render(len(messages), False)
        if not whole.startswith(done):
            raise ValueError(
                "use_chat_template: this tokenizer's chat template renders earlier turns differently once later "
                f"turns follow ({_short(messages)}), so the turns cannot be masked; set use_chat_template: false"
            )
        segments.append((whole[len(done) :], False))
    return segments


def _empty_head(tokenizer: Any, render: Callable[[int, bool], str]) -> str:
    # A conversation opening with the assistant: the prefix is the generation prompt of no messages, which some
    # templates cannot render; then the whole turn, headers included, is learned.
    try:
        return render(0, True)
    except ValueError:
        return ""


def plain_segments(messages: list[Message]) -> list[Segment]:
    """Segments without a chat template: `content + "\\n"` masked, an assistant's `content` learned (EOS follows)."""
    return [
        (m["content"], True) if m["role"] == "assistant" else (m["content"] + "\n", False) for m in messages
    ]


def tokenize_conversations(
    tokenizer: Any, conversations: list[list[Message]], use_chat_template: bool, max_length: int
) -> dict[str, list[list[int]]]:
    """input_ids, attention_mask and labels (-100 outside the assistant turns) of each conversation, truncated on
    the right to `max_length`.

    Raises:
        ValueError: see `chat_segments`; without a template, a tokenizer without an EOS token.
    """
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    bos: list[int] = []
    eos: list[int] = []
    if not templated:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "use_chat_template: sft without a chat template needs a tokenizer with an eos_token"
            )
        eos = [tokenizer.eos_token_id]
        # Start with BOS exactly when the tokenizer itself starts sequences with it (Llama yes, GPT-2 no).
        if tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
            bos = [tokenizer.bos_token_id]
    per_row = [chat_segments(tokenizer, c) if templated else plain_segments(c) for c in conversations]
    # One tokenizer call for every segment of the batch; the template writes its own special tokens.
    texts = [text for segments in per_row for text, _ in segments]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    input_ids, labels = [], []
    for segments in per_row:
        ids, lab = list(bos), [IGNORE_INDEX] * len(bos)
        for _, learned in segments:
            piece = list(next(encoded)) + (eos if learned else [])
            ids += piece
            lab += piece if learned else [IGNORE_INDEX] * len(piece)
        input_ids.append(ids[:max_length])
        labels.append(lab[:max_length])
    return {"input_ids": input_ids, "attention_mask": [[1] * len(x) for x in input_ids], "labels": labels}
