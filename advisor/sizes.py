"""Model size classes written the way people write them ("1.3B", "350M")."""

from __future__ import annotations

import re

from advisor.errors import AdviceError


def parse_size(value: str | float | int) -> float:
    """'1.3B', '350M', '7b', 1.3e9 -> parameter count (float)."""
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", value.lower())
        if not m:
            raise AdviceError(f"model size {value!r} is not a size like 1.3B or 350M")
        n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2)]
    if not n >= 1e6:
        raise AdviceError(f"model size {value!r} is below 1M parameters; write it like 1.3B or 350M")
    return n
