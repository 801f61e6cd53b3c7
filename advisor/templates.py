"""Chat templates: which one a run uses, rendering a conversation, and where its answers are.

Rendering follows transformers' conventions for Jinja chat templates (a sandboxed environment
with ``trim_blocks`` / ``lstrip_blocks``, loop controls, ``raise_exception``, ``strftime_now``, a
``tojson`` that keeps non-ASCII text, the tokenizer's special tokens as variables), so a model's
own template renders here as it does in transformers; a test compares the two.

Trained spans are found on the rendered text, never by re-tokenizing pieces: for assistant turn
``i``, the rendering of the turns before it with the generation prompt must be a prefix of the
rendering through turn ``i``, which must be a prefix of the whole conversation's; the answer is
what lies between (its content and end-of-turn token, trailing whitespace left out). A template
that renders earlier turns differently in a longer conversation is refused with a clear error.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from advisor.errors import UserError

# ChatML (as Qwen and many fine-tunes use it), for tokenizers without a template of their own.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN = {"chatml": CHATML}


class TemplateError(UserError):
    """A conversation the template cannot render (or renders in a way answers cannot be found in)."""


def choose(tokenizer_template: str | None, given: str | None) -> tuple[str, str]:
    """(template source, where it came from): ``--chat-template`` (a file or a built-in name), else
    the tokenizer's own, else ChatML."""
    if given:
        if given in BUILTIN:
            return BUILTIN[given], f"built-in {given}"
        path = Path(given).expanduser()
        if not path.is_file():
            raise UserError(f"--chat-template {given}: no such file (or use one of: {', '.join(BUILTIN)})")
        return path.read_text(encoding="utf-8"), str(path)
    if tokenizer_template:
        return tokenizer_template, "the tokenizer's chat template"
    return CHATML, "built-in chatml (the tokenizer has no chat template; --chat-template FILE to choose)"


@lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant markers): rendered as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise UserError(f"chat template does not parse: {exc}") from None


def render(source: str, messages: list[dict], special: dict[str, Any], *, add_generation_prompt: bool = False) -> str:
    """The conversation as the template writes it (``special``: bos_token, eos_token, ...)."""
    import jinja2

    try:
        return _compile(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                       tools=None, documents=None, **{k: v for k, v in special.items() if v})
    except jinja2.exceptions.TemplateError as exc:
        raise TemplateError(f"the chat template failed to render it: {exc}") from None
    except Exception as exc:  # a template's own bug: an undefined attribute, a type error
        raise TemplateError(f"the chat template failed to render it ({type(exc).__name__}: {exc})") from None


def assistant_spans(source: str, messages: list[dict], special: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, character span of every assistant answer: content + end-of-turn)."""
    full = render(source, messages, special)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(source, messages[:i], special, add_generation_prompt=True)
        through = render(source, messages[:i + 1], special)
        if not (through.startswith(before) and full.startswith(through)):
            raise TemplateError(f"the chat template renders turn {i + 1} differently once later turns follow, so its "
                                "answer cannot be located in the text; pass --chat-template FILE with a template "
                                "that keeps earlier turns as they are")
        end = len(through.rstrip())
        if end <= len(before):
            raise TemplateError(f"assistant turn {i + 1} renders as nothing")
        spans.append((len(before), end))
    return full, spans
