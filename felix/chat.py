"""The chat template, one for every use: `felix serve` builds prompts with it and `felix data shard` renders
chat-format records (`felix harvest export`) with it, so the model trains on chats as it is served them.

A turn is `<|role|>content<|end|>`; a prompt ends with `<|assistant|>`, which opens the model's turn. Role
markers are ids, never text: content is encoded as plain text, so a literal `<|end|>` in a message cannot
forge a turn boundary. `felix.export_gguf.CHAT_TEMPLATE` is the same template in Jinja.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from felix.errors import FelixError

if TYPE_CHECKING:  # felix.tokenizer imports felix.corpus, which imports this module
    from felix.tokenizer import FelixTokenizer

ROLES = {"system": "<|system|>", "developer": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"


class ChatFormatError(FelixError):
    """A malformed `messages` list; the message names the entry (`messages[2].content ...`)."""


def message_text(content: Any, where: str) -> str:
    """Message content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ChatFormatError(f"{where}.content must be a string or a list of text parts")


def chat_turns(messages: Any, system: Any = None) -> list[tuple[str, str]]:
    """(role, text) per turn of an OpenAI-style `messages` list, `system` first when given."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("'messages' must be a non-empty list")
    turns = []
    if system is not None:
        if not isinstance(system, str):
            raise ChatFormatError("'system' must be a string")
        turns.append(("system", system))
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            raise ChatFormatError(f"messages[{i}] needs a role in {sorted(ROLES)}")
        turns.append((m["role"], message_text(m.get("content"), f"messages[{i}]")))
    return turns


def chat_ids(tok: FelixTokenizer, turns: list[tuple[str, str]], prompt: bool = True) -> list[int]:
    """Token ids of `turns` in the chat template; with `prompt`, `<|assistant|>` follows to open the
    model's turn (serving), without it the conversation stands whole (a training document)."""
    sp = tok.special_ids
    ids: list[int] = []
    for role, text in turns:
        ids += [sp[ROLES[role]], *tok.encode(text), sp[END]]
    return [*ids, sp[ROLES["assistant"]]] if prompt else ids


class ChatDocument(str):
    """A training document that is a whole chat: the string is the template spelled out (what decoding its
    ids gives), `turns` the conversation. `FelixTokenizer.encode_batch` encodes it with `chat_ids`, role
    markers as ids; any other string's special-token spellings stay text."""

    turns: list[tuple[str, str]]

    def __new__(cls, turns: list[tuple[str, str]]) -> ChatDocument:
        doc = super().__new__(cls, "".join(f"{ROLES[role]}{text}{END}" for role, text in turns))
        doc.turns = turns
        return doc
