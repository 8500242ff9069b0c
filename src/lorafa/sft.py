"""Instruction-tuning examples (task `sft`): conversations → token ids with only the assistant's turns learned.

A training row is a conversation: a list of messages `{"role": ..., "content": ...}` (ShareGPT's
`{"from": "human" | "gpt", "value": ...}` and other role names are read too, see `conversation`), given whole
(`DataConfig.messages_column`) or built by `lorafa.data` from a prompt/response row. With the tokenizer's chat
template the conversation is rendered as the model expects and every assistant answer, with the template's
end-of-turn marker, is learned; everything else (system prompt, user turns, turn headers) is masked. The learned
character spans come from probing the template (`chat_spans`); a fast tokenizer then tokenizes the whole rendering
once, as at inference, and learns the tokens that overlap a span (through its character offsets); a slow one finds
the token edges by tokenizing the text up to each span edge. Without a template the pieces are `content + "\n"`
for other roles and `content` + EOS for the assistant, after the tokenizer's BOS if it uses one, tokenized apart
(`plain_prompt_ids` builds a prompt the same way for generation).
"""

from __future__ import annotations

import bisect
import json
import os
from typing import Any

IGNORE_INDEX = -100
"""Label value that Hugging Face losses skip."""

CONVERSATION_COLUMNS = ("messages", "conversations")
"""Columns read as conversations when `messages_column` is unset and the data has no `prompt_column`."""

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
"""Roles chat templates know; others pass to the template unchanged (and are never learned)."""

# Other names of the user and the assistant (case aside): ShareGPT, Gemini, OpenAssistant, assorted scrapes.
_ROLE_NAMES = {
    "human": "user",
    "prompter": "user",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
}

Message = dict[str, str]
Segment = tuple[str, bool]
"""(text, learned): a piece of a rendered conversation and whether its tokens are trained on."""


def conversation(value: Any) -> list[Message]:
    """One row's conversation as [{"role", "content"}, ...], from role/content or ShareGPT from/value messages.

    A string is parsed as JSON first (a CSV cell holding a conversation). Roles are lower-cased; `human` and
    `prompter` become `user`, `gpt`, `model`, `bot`, `chatgpt` and `bing` become `assistant`; other roles pass
    through unchanged (only `assistant` turns are learned). A content given as text parts
    (`[{"type": "text", "text": ...}, ...]`) is joined into one string.

    Raises:
        ValueError: not a list of messages, a message without role/content strings, or no messages at all.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"a string that is not a JSON list of messages ({e.msg})") from None
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"expected a non-empty list of messages, got {short_repr(value)}")
    out: list[Message] = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"message {k} is {short_repr(m)}, not an object with role and content")
        role = m.get("role") if m.get("role") is not None else m.get("from")
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" for p in content
        ):
            content = "".join(str(p.get("text", "")) for p in content)  # OpenAI-style text parts
        if content is None and m.get("tool_calls"):
            raise ValueError(
                f"message {k} is a tool call without text content; lorafa trains on text conversations (drop "
                "such rows, or render tool calls into the content)"
            )
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise ValueError(
                f"message {k} needs a role (or from) and a content (or value) string, got {short_repr(m)}"
            )
        role = role.strip().lower()
        out.append({"role": _ROLE_NAMES.get(role, role), "content": content})
    return out


def short_repr(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters (for error messages)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Stands in for an answer while probing the template: private-use characters, which no template rewrites.
_PLACEHOLDER = "\ue000lorafa\ue001"


def chat_spans(tokenizer: Any, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template rendering of `messages` and the character spans learned in it, one per assistant turn.

    For the assistant turn i the template renders `messages[:i]` plus an assistant message holding a placeholder:
    the text before the placeholder is the prompt (everything up to the turn's header), the text after it the
    turn's end (end-of-turn marker, and, when the turn is last, whatever closes a conversation). The learned span
    runs from the answer to the end of the marker as the whole conversation renders it: where the turn's end and
    the whole rendering part (never inside a special token), so text a template writes only after a conversation's
    last turn (Phi-3's EOS) is not learned in the middle.

    Raises:
        ValueError: the template fails on the conversation, does not write an answer verbatim, or renders the
            earlier turns differently once later turns follow (e.g. it drops the reasoning of earlier answers).
    """

    def render(part: list[Message], generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(
                part, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # jinja2 TemplateError, or a template's own raise_exception
            raise ValueError(
                f"use_chat_template: the tokenizer's chat template fails on the conversation "
                f"{short_repr(messages)}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None

    whole = render(messages)
    specials = [t for t in getattr(tokenizer, "get_added_vocab", dict)() if t]
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        probe = render([*messages[:i], {"role": "assistant", "content": _PLACEHOLDER}])
        k = probe.find(_PLACEHOLDER)
        if k < 0:
            raise ValueError(
                "use_chat_template: the tokenizer's chat template does not write an assistant message's content "
                "as it is, so the answer cannot be found in the rendering; set use_chat_template: false"
            )
        head, tail = probe[:k], probe[k + len(_PLACEHOLDER) :]
        turn = render(messages[: i + 1])
        # What inference sends (the generation prompt) must start the prompt trained on; the template may add
        # text of its own after it when an answer follows (Qwen3's empty reasoning block), which stays masked.
        asked = render(messages[:i], True) if i > 0 else ""
        if not (
            head.startswith(asked)
            and turn.startswith(head)
            and turn.endswith(tail)
            and len(turn) >= len(head) + len(tail)
        ):
            raise ValueError(
                "use_chat_template: this tokenizer's chat template renders the prompt differently with and "
                f"without the answer (assistant turn {i} of {short_repr(messages)}), so the prompt cannot be "
                "masked; set use_chat_template: false"
            )
        answer_end = len(turn) - len(tail)
        start = spans[-1][1] if spans else 0
        if not whole.startswith(turn[:answer_end]) or len(head) < start:
            raise ValueError(
                "use_chat_template: this tokenizer's chat template renders earlier turns differently once later "
                f"turns follow (assistant turn {i} of {short_repr(messages)}; e.g. it drops the reasoning of "
                "earlier answers), so the answers cannot be cut out of the whole conversation; give one assistant "
                "turn per row (the earlier turns as context), or set use_chat_template: false"
            )
        spans.append((len(head), answer_end + _shared_prefix(tail, whole[answer_end:], specials)))
    return whole, spans


def _shared_prefix(a: str, b: str, specials: list[str]) -> int:
    """Length of the common prefix of `a` and `b`, cut back so that it ends outside every special token of either
    (so "<|end|><|endoftext|>" and "<|end|><|user|>" share "<|end|>", not "<|end|><|")."""
    n = len(os.path.commonprefix([a, b]))
    if n == len(a):
        return n
    moved = True
    while moved:
        moved = False
        for text in (a, b):
            for t in specials:
                p = text.find(t, max(0, n - len(t) + 1))
                if 0 <= p < n < p + len(t):
                    n, moved = p, True
    return n


def plain_segments(messages: list[Message]) -> list[Segment]:
    """Segments without a chat template: `content + "\\n"` masked, an assistant's `content` learned (EOS follows)."""
    return [
        (m["content"], True) if m["role"] == "assistant" else (m["content"] + "\n", False) for m in messages
    ]


def tokenize_conversations(
    tokenizer: Any,
    conversations: list[list[Message]],
    use_chat_template: bool,
    max_length: int,
    rows: list[int] | None = None,
) -> dict[str, list[list[int]]]:
    """input_ids, attention_mask and labels (-100 outside the assistant turns) of each conversation, truncated on
    the right to `max_length`; `rows` (each conversation's row in its file) go into error messages.

    Raises:
        ValueError: see `chat_spans`; without a template, a tokenizer without an EOS token.
    """
    if not (use_chat_template and getattr(tokenizer, "chat_template", None)):
        return _tokenize_plain(tokenizer, conversations, max_length)
    rendered = []
    for k, c in enumerate(conversations):
        try:
            rendered.append(chat_spans(tokenizer, c))
        except ValueError as e:
            raise ValueError(f"row {rows[k] if rows is not None else k}: {e}") from None
    return _tokenize_rendered(tokenizer, rendered, max_length)


def _examples(
    input_ids: list[list[int]], labels: list[list[int]], max_length: int
) -> dict[str, list[list[int]]]:
    """The tokenized examples, truncated on the right to `max_length`."""
    input_ids, labels = [x[:max_length] for x in input_ids], [x[:max_length] for x in labels]
    return {"input_ids": input_ids, "attention_mask": [[1] * len(x) for x in input_ids], "labels": labels}


def _tokenize_plain(
    tokenizer: Any, conversations: list[list[Message]], max_length: int
) -> dict[str, list[list[int]]]:
    """`plain_segments` tokenized piece by piece, EOS after each answer, BOS first where the tokenizer uses one."""
    if tokenizer.eos_token_id is None:
        raise ValueError("use_chat_template: sft without a chat template needs a tokenizer with an eos_token")
    eos, bos = [tokenizer.eos_token_id], _bos(tokenizer)
    per_row = [plain_segments(c) for c in conversations]
    # One tokenizer call for every piece of the batch.
    texts = [text for segments in per_row for text, _ in segments]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    input_ids, labels = [], []
    for segments in per_row:
        ids, lab = list(bos), [IGNORE_INDEX] * len(bos)
        for _, learned in segments:
            piece = list(next(encoded)) + (eos if learned else [])
            ids += piece
            lab += piece if learned else [IGNORE_INDEX] * len(piece)
        input_ids.append(ids)
        labels.append(lab)
    return _examples(input_ids, labels, max_length)


def _bos(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer itself starts sequences with it (Llama yes, GPT-2 no), else []."""
    if tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return [tokenizer.bos_token_id]
    return []


def plain_prompt_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of a prompt (no assistant turn) in the plain format sft trains on without a chat template, for
    generation: BOS where the tokenizer uses one, then each message's `content + "\n"`, no other special token."""
    texts = [text for text, _ in plain_segments(messages)]
    pieces = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return _bos(tokenizer) + [i for piece in pieces for i in piece]


def _tokenize_rendered(
    tokenizer: Any, rendered: list[tuple[str, list[tuple[int, int]]]], max_length: int
) -> dict[str, list[list[int]]]:
    """Tokenize each whole rendering once (as at inference; the template writes its own special tokens) and learn
    the tokens inside the learned spans: found through a fast tokenizer's character offsets (a token overlapping a
    span is learned; a zero-width one only strictly inside), else by tokenizing the text up to each span edge."""
    texts = [text for text, _ in rendered]
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=fast)
    input_ids, labels = [], []
    for k, ((text, spans), ids) in enumerate(zip(rendered, enc["input_ids"], strict=True)):
        ids = list(ids)
        if fast:
            lab = [
                tok if _in_span(spans, s, e) else IGNORE_INDEX
                for tok, (s, e) in zip(ids, enc["offset_mapping"][k], strict=True)
            ]
        else:
            lab = [IGNORE_INDEX] * len(ids)
            for start, end in spans:
                a, b = _token_edge(tokenizer, text, start, ids), _token_edge(tokenizer, text, end, ids)
                lab[a:b] = ids[a:b]
        input_ids.append(ids)
        labels.append(lab)
    return _examples(input_ids, labels, max_length)


def _in_span(spans: list[tuple[int, int]], s: int, e: int) -> bool:
    """Whether the token at characters [s, e) overlaps one of `spans` (sorted, disjoint), or, when zero-width, lies
    strictly inside one. The first span ending after s is the only candidate: O(log spans) per token."""
    j = bisect.bisect_right(spans, s, key=lambda span: span[1])
    if j == len(spans):
        return False
    start, end = spans[j]
    return start < e if e > s else start < s < end


def _token_edge(tokenizer: Any, text: str, k: int, ids: list[int]) -> int:
    """The token index in `ids` (the ids of `text`) where character k falls: how many leading ids the ids of
    text[:k] share with them (a token merging across k goes to the part after it)."""
    head = tokenizer(text[:k], add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(head), len(ids)) and head[n] == ids[n]:
        n += 1
    return n
