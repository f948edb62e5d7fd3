"""Turning a problem's chat messages into the text the model is fed.

Problems keep their prompt as chat messages (VERL style). When the tokenizer has a
chat template it is applied (with the generation prompt); otherwise the messages'
contents are joined with newlines, which is what a plain LM like the tiny model expects.
"""

from __future__ import annotations

import json
from typing import Any

from gradalign_common.errors import InvalidInputError


def normalize_messages(prompt: Any, where: str = "prompt") -> list[dict[str, str]]:
    """Accept a list of {role, content} messages or a plain string; return messages."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidInputError(f"{where}: empty prompt")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise InvalidInputError(f"{where}: must be a non-empty list of chat messages or a string")
    messages = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise InvalidInputError(f"{where}[{i}]: a message needs string 'role' and 'content'")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def encode_messages(messages: list[dict[str, str]]) -> str:
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":"))


def decode_messages(prompt: str) -> list[dict[str, str]]:
    return json.loads(prompt)


def render_prompt(prompt: str, tokenizer) -> str:
    """Text to feed the model for a Problem.prompt (JSON-encoded chat messages)."""
    messages = decode_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)
