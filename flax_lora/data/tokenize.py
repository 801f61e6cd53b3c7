"""Rows as token ids with a loss mask: the prompt is context, the target is what is learned.

Chat rows are rendered with the tokenizer's chat template when it has one (else the plain
``role: content`` rendering of :func:`advisor.formats.render_plain`); every other format as
:func:`advisor.formats.to_text` writes it, the text ``lora advise --data`` measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from advisor.formats import Format, to_text


def render(row: dict[str, Any], fmt: Format, tokenizer) -> tuple[str, str]:
    """One checked row as (prompt, target) text, chats through the tokenizer's template."""
    if fmt.kind == "messages" and getattr(tokenizer, "chat_template", None):
        messages = row["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        return prompt, str(messages[-1]["content"])
    return to_text(row, fmt)


@dataclass
class Example:
    ids: np.ndarray  # int32 [n] prompt + target (+ eos)
    loss_mask: np.ndarray  # int32 [n], 1 on target tokens
    prompt_len: int
    prompt: str
    target: str
    truncated: bool = False  # longer than max_length, cut


def tokenize(pairs: Sequence[tuple[str, str]], tokenizer, max_length: int) -> list[Example]:
    """Tokenize (prompt, target) pairs; targets end with eos; truncated to ``max_length``.

    When too long, the target keeps at most half the budget (or what it needs) and the prompt
    is cut from the left, so the tokens nearest the answer survive.
    """
    eos = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    out = []
    for prompt, target in pairs:
        p = bos + (tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else [])
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        truncated = len(p) + len(t) > max_length
        if truncated:
            t = t[: max(max_length - len(p), max_length // 2)]
            p = p[len(p) - (max_length - len(t)):] if max_length > len(t) else []
        ids = np.asarray(p + t, np.int32)
        mask = np.zeros(len(ids), np.int32)
        mask[len(p):] = 1
        out.append(Example(ids, mask, len(p), prompt, target, truncated))
    return out


