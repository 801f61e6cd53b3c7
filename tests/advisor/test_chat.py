"""Chat data done right, on four template styles (ChatML/Qwen, Llama 3, Gemma, Mistral) with
tokenizers built offline: the template renders as transformers renders it, every assistant turn
(content + end-of-turn) is trained and nothing else, token boundaries come from one tokenization
of the whole text, and there is one BOS."""

from __future__ import annotations

import json

import pytest

from advisor.errors import UserError
from advisor.examples import encode, encode_rows, render_row
from advisor.formats import Format, check_rows, detect_format
from advisor.rows import RowReport
from advisor.templates import CHATML, TemplateError, assistant_spans, choose, render
from tests.helpers import CHAT_STYLES, chat_tokenizer

CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Tell me a joke about cats, please!"},
        {"role": "assistant", "content": "Why did the cat sit on the computer? To keep an eye on the mouse."}]
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "</s>"}
STYLES = sorted(CHAT_STYLES)


@pytest.fixture(scope="module", params=STYLES)
def style(request):
    return request.param, chat_tokenizer(request.param)


def test_renders_as_transformers_does(style):
    from transformers import PreTrainedTokenizerFast

    name, tok = style
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend, chat_template=tok.chat_template,
                                 **{k: v for k, v in tok.special.items() if v})
    for gen in (False, True):
        ours = render(tok.chat_template, CHAT[:3] if gen else CHAT, tok.special, add_generation_prompt=gen)
        assert ours == hf.apply_chat_template(CHAT[:3] if gen else CHAT, tokenize=False, add_generation_prompt=gen)


def test_every_answer_and_its_end_of_turn_are_trained_and_nothing_else(style):
    name, tok = style
    fmt = Format("chat", None, "messages")
    ex = encode(render_row({"messages": CHAT}, fmt, tok.chat_template, tok.special), tok, pieces=True)
    trained = [text for text, on in ex.pieces if on]
    leading = " " if name == "mistral" else ""  # Mistral's template puts a space before the answer
    assert trained == [f"{leading}{m['content']}{END[name]}" for m in CHAT if m["role"] == "assistant"]
    untrained = "".join(text for text, on in ex.pieces if not on)
    assert all(m["content"] not in untrained for m in CHAT if m["role"] == "assistant")
    assert all(m["content"] in untrained for m in CHAT if m["role"] == "user")


def test_one_tokenization_of_the_whole_text_and_one_bos(style):
    name, tok = style
    fmt = Format("chat", None, "messages")
    rendered = render_row({"messages": CHAT}, fmt, tok.chat_template, tok.special)
    ex = encode(rendered, tok)
    assert ex.ids.tolist() == tok.backend.encode(rendered.text, add_special_tokens=False).ids
    if tok.bos_id is not None:
        assert tok.prefix == [tok.bos_id]  # tokenizer(text) adds one ...
        assert ex.ids.tolist().count(tok.bos_id) == 1 and ex.ids[0] == tok.bos_id  # ... the template's is the one
    # evaluation generates the last answer from the prompt before it
    assert tok.decode(ex.ids[ex.prompt_len:], skip_special_tokens=True).strip().startswith("Why did the cat")
    assert ex.target == CHAT[-1]["content"]


def test_sharegpt_rows_are_chats():
    tok = chat_tokenizer("chatml")
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of France?"},
                             {"from": "gpt", "value": "Paris."}]}
    fmt = detect_format(list(row))
    assert fmt.sharegpt and fmt.describe() == "sharegpt(conversations)"
    ex = encode(render_row(row, fmt, tok.chat_template, tok.special), tok, pieces=True)
    assert [t for t, on in ex.pieces if on] == ["Paris.<|im_end|>"]
    assert "<|im_start|>system\nBe brief." in "".join(t for t, _ in ex.pieces)


@pytest.mark.parametrize("turns,reason", [
    ([{"from": "human", "value": "hi"}, {"from": "robot", "value": "hello"}], "unknown role 'robot'"),
    ([{"from": "human", "value": "hi"}], "no assistant turn"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}], "an assistant turn is empty"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], "'value' is int, not text"),
    ([{"value": "hi"}, {"from": "gpt", "value": "x"}], "has no 'from'"),
])
def test_bad_conversations_are_bad_rows_by_line(turns, reason):
    ok = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    report = RowReport("d.jsonl", "line", total=2)
    good, numbers = check_rows([ok, {"conversations": turns}], [1, 2], report, Format("chat", None, "conversations",
                                                                                         sharegpt=True))
    assert numbers == [1] and report.bad[0].line == 2 and reason in report.bad[0].reason


def test_a_template_that_fails_to_render_is_a_bad_row_not_a_traceback():
    tok = chat_tokenizer("gemma")  # Gemma's template refuses a system turn
    system = {"messages": [{"role": "system", "content": "x"}, *CHAT[:2]]}
    rows = [(system if n == 2 else {"messages": CHAT[:2]}, n) for n in range(1, 21)]
    report = RowReport("d.jsonl", "line", total=20)
    out = encode_rows(rows, Format("chat", None, "messages"), tok, tok.chat_template, report, policy="skip")
    assert len(out) == 19 and [b.line for b in report.bad] == [2]
    assert "System role not supported" in report.bad[0].reason
    with pytest.raises(UserError, match="line 2: the chat template failed to render it: System role not supported"):
        encode_rows(rows, Format("chat", None, "messages"), tok, tok.chat_template, RowReport("d", "line", total=20),
                    policy="fail")


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # drops the content of every assistant turn but the last (like templates that strip reasoning)
    template = ("{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' and not loop.last %}"
                "[...]{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(TemplateError, match="renders turn 2 differently"):
        assistant_spans(template, CHAT, {})


def test_template_choice_file_builtin_tokenizers_or_chatml(tmp_path):
    assert choose("{{ x }}", None) == ("{{ x }}", "the tokenizer's chat template")
    assert choose(None, None)[0] == CHATML and "no chat template" in choose(None, None)[1]
    assert choose("{{ x }}", "chatml") == (CHATML, "built-in chatml")
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert choose(None, str(tmp_path / "t.jinja"))[0] == "{{ messages[0]['content'] }}"
    with pytest.raises(UserError, match="no such file"):
        choose(None, str(tmp_path / "missing.jinja"))


def test_a_file_mixing_formats_names_what_the_odd_rows_are(tmp_path):
    rows = [{"messages": CHAT[:2]}] * 9 + [{"instruction": "Add 1 and 2", "output": "3"}]
    report = RowReport("d.jsonl", "line", total=10)
    check_rows(rows, list(range(1, 11)), report, detect_format(["messages"]))
    assert report.bad[0].line == 10 and "a alpaca(instruction -> output) row in a chat(messages) file" in report.bad[0].reason
    assert json.dumps(report.bad[0].reason)
