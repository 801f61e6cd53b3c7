"""A model's tokenizer read straight from its files: ``tokenizer.json`` (the ``tokenizers``
library) plus ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``chat_template.jinja``.

The one tokenizer both ``lora advise --data`` and ``lora train`` use, so lengths and masks agree
token for token; it needs neither transformers nor jax. Special tokens follow the files as
transformers reads them: the BOS/EOS a plain ``tokenizer(text)`` adds come from the
post-processor (adjusted by ``add_bos_token`` / ``add_eos_token`` when the config sets them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from advisor.errors import UserError

SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")
TEMPLATE_FILES = ("chat_template.jinja",)


def content_of(value: Any) -> str | None:
    """A special token as a string (configs store either the string or an AddedToken dict)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def template_of(config: dict, folder: Path | None) -> str | None:
    """The tokenizer's own chat template: ``chat_template.jinja`` or ``tokenizer_config.json``."""
    for name in TEMPLATE_FILES:
        if folder is not None and (folder / name).is_file():
            return (folder / name).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template.strip() else None


class Tokenizer:
    """Encode with character offsets, decode, and the special tokens a causal LM needs."""

    def __init__(self, backend, config: dict | None = None, *, chat_template: str | None = None, name: str = ""):
        self.backend, self.name = backend, name
        config = dict(config or {})
        self.special = {k: content_of(config.get(k)) for k in SPECIALS}
        self.chat_template = chat_template
        self.bos_id = self._id(self.special["bos_token"])
        self.eos_id = self._id(self.special["eos_token"])
        pad = self._id(self.special["pad_token"])
        self.pad_id = pad if pad is not None else self.eos_id  # None: no padding possible (training checks)
        self.prefix, self.suffix = self._post_processor_specials(config)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise UserError(f"{folder}: no tokenizer.json")
        try:
            backend = Backend.from_file(str(file))
        except Exception as exc:  # the tokenizers library raises its own Exception types
            raise UserError(f"{file}: not a readable tokenizer ({exc})") from None
        config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        return cls(backend, config, chat_template=template_of(config, folder), name=str(folder))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def _post_processor_specials(self, config: dict) -> tuple[list[int], list[int]]:
        """(ids before, ids after) the text that ``tokenizer(text)`` adds, as transformers does."""
        probe = "a"
        plain = self.backend.encode(probe, add_special_tokens=False).ids
        full = self.backend.encode(probe, add_special_tokens=True).ids
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
        prefix, suffix = full[:at], full[at + len(plain):]
        for flag, token, side in (("add_bos_token", self.bos_id, prefix), ("add_eos_token", self.eos_id, suffix)):
            if token is None or flag not in config:
                continue
            if config[flag] and token not in side:
                side.insert(0 if side is prefix else len(side), token)
            elif not config[flag] and token in side:
                side.remove(token)
        return prefix, suffix

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and each token's character span, with no special tokens added."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def encode_prompt(self, text: str) -> list[int]:
        """``text`` as ``tokenizer(text)`` gives it: the model's BOS (if any) first."""
        return self.prefix + self.encode(text)[0]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()
