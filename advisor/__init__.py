"""The config advisor: the guide's rules + a memory model -> a complete LoRA training config.

``advise(request)`` or ``advise(samples=3000, vram_gb=12, task="summarization", ...)``.
Imports only pydantic and the standard library (never jax, torch or transformers), so that
``lora advise`` starts fast.
"""

from __future__ import annotations

from advisor.errors import AdviceError
from advisor.schema import Advice, AdviceRequest


def advise(request: AdviceRequest | None = None, /, **fields) -> Advice:
    """Advice for a request (or the request's fields as keywords); bad input -> AdviceError."""
    from advisor import rules

    return rules.advise(rules.make_request(request, **fields))


__all__ = ["Advice", "AdviceError", "AdviceRequest", "advise"]
