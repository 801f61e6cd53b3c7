"""`lora generate`: a chat run's prompt is a user turn in its chat template, encoded as training
encodes the same conversation (one BOS); the answer stops at the template's end-of-turn; greedy by
default, sampled with --temperature/--top-p/--seed; bad values are one line, exit 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from advisor.examples import encode, render_row
from advisor.formats import named_format
from cli.main import cli
from flax_lora.evaluation.evaluator import Evaluator
from flax_lora.evaluation.generate import Prompt, end_of_turn
from tests.helpers import CHAT_STYLES, chat_tokenizer

QUESTION = "What is the capital of France?"
CHAT = named_format("chat", None, None)


def _conversation(system: str | None):
    turns = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "The capital of France is Paris."}]
    return ([{"role": "system", "content": system}] if system is not None else []) + turns


def _training_prompt(tok, template, system=None) -> list[int]:
    """The prompt part of what `lora train` builds for a chat whose last turn is the assistant's."""
    ex = encode(render_row({"messages": _conversation(system)}, CHAT, template, tok.special), tok)
    return ex.ids[:ex.prompt_len].tolist()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama with a byte-level ChatML tokenizer (its vocabulary is the model's)."""
    from transformers import LlamaConfig

    from flax_lora.models import hub
    from flax_lora.models.decoder import causal_lm_from_config

    d = tmp_path_factory.mktemp("chat_llama")
    tok = chat_tokenizer("chatml", d / "model")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=tok.vocab_size(), max_position_embeddings=128,
                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, initializer_range=0.2)
    hub.save_pt_safetensors(d / "model", causal_lm_from_config(cfg, seed=0).params, cfg)
    rows = [{"messages": _conversation(None if i % 2 else "Be brief.")} for i in range(24)]
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d, tok


@pytest.fixture
def spy(monkeypatch):
    """Records what each `lora generate` hands the decoder: prompt ids, stop ids, sampling."""
    calls = []
    generate = Evaluator.generate

    def record(self, lora, frozen, prompts, sampling=None):
        calls.append({"ids": [int(i) for i in prompts[0]], "stops": self.stop_ids, "sampling": sampling})
        return generate(self, lora, frozen, prompts, sampling)

    monkeypatch.setattr(Evaluator, "generate", record)
    return calls


def _generate(*args):
    res = CliRunner().invoke(cli, ["generate", *map(str, args)])
    assert res.exit_code == 0, res.output
    return res.stdout


@pytest.mark.parametrize("style, system", [(s, None) for s in CHAT_STYLES] +
                         [(s, "Be brief.") for s in CHAT_STYLES if s != "gemma"])  # gemma has no system role
def test_generation_starts_from_the_prompt_training_builds(style, system):
    tok = chat_tokenizer(style)
    p = Prompt.chat(tok, tok.chat_template, QUESTION, system)
    assert list(p.ids) == _training_prompt(tok, tok.chat_template, system)
    if tok.bos_id is not None:  # the template writes the BOS, nothing adds a second
        assert p.ids[0] == tok.bos_id and tok.bos_id not in p.ids[1:]
    marker = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "</s>"}[style]
    assert end_of_turn(tok.chat_template, tok.special) == marker
    assert set(p.stop_ids) == {tok.eos_id, tok.token_id(marker)} and p.cut is None
    assert Prompt.plain(tok, QUESTION).ids == tuple(tok.encode_prompt(QUESTION))


def test_an_end_of_turn_of_several_tokens_is_cut_from_the_text():
    tok = chat_tokenizer("chatml")
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n### End\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    p = Prompt.chat(tok, template, QUESTION)
    assert p.cut == "### End" and p.stop_ids == (tok.eos_id,)
    assert list(p.ids) == _training_prompt(tok, template)
    answer = tok.encode("Paris.\n### End\nuser: more")[0]
    assert p.answer(tok, answer) == "Paris."


@pytest.mark.parametrize("args, needle", [
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--system", "Be brief."], "--system needs a chat prompt"),
    (["--chat", "--no-chat", "--system", "Be brief."], "--system needs a chat prompt"),
])
def test_bad_values_are_one_line_exit_2(args, needle, tmp_path):
    res = CliRunner().invoke(cli, ["generate", "--model", str(tmp_path / "none"), "--prompt", "hi", *args])
    assert res.exit_code == 2, res.output
    assert res.stdout == "" and needle in res.stderr and res.stderr.startswith("error: ")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


@pytest.mark.slow
def test_model_folder_with_chat_greedy_and_sampled(chat_model, spy):
    d, tok = chat_model
    base = ["--model", d / "model", "--prompt", QUESTION, "--max-new-tokens", 8]
    greedy = _generate(*base, "--chat", "--system", "Be brief.")
    assert spy[-1]["ids"] == _training_prompt(tok, tok.chat_template, "Be brief.")
    assert tok.eos_id in spy[-1]["stops"] and spy[-1]["sampling"].greedy
    assert greedy.strip() and QUESTION not in greedy and "Be brief" not in greedy  # the continuation only
    assert _generate(*base, "--chat", "--system", "Be brief.", "--temperature", 0) == greedy
    hot = [_generate(*base, "--chat", "--temperature", 3, "--seed", seed) for seed in (1, 1, 2)]
    assert hot[0] == hot[1] and hot[0] != hot[2]  # a seed reproduces its text; seeds differ
    _generate(*base, "--chat", "--temperature", 0.7, "--top-p", 1e-6)  # a tiny nucleus is greedy
    assert spy[-1]["ids"] == _training_prompt(tok, tok.chat_template) and not spy[-1]["sampling"].greedy
    _generate(*base)  # no --chat: the prompt as tokenizer(text) encodes it
    assert spy[-1]["ids"] == tok.encode_prompt(QUESTION)


@pytest.mark.slow
def test_run_trained_on_chats_prompts_with_a_user_turn(chat_model, spy, tmp_path):
    d, tok = chat_model
    res = CliRunner().invoke(cli, ["train", "--model", str(d / "model"), "--data", str(d / "chat.jsonl"),
                                   "--output", str(tmp_path / "run"), "--max-steps", "2", "--max-length", "64", "--quiet"])
    assert res.exit_code == 0, res.output
    end = tok.encode("<|im_end|>")[0]
    assert len(end) == 1 and spy and all(end[0] in call["stops"] for call in spy)  # the run's ROUGE answers end there
    n = len(spy)
    assert CliRunner().invoke(cli, ["eval", str(tmp_path / "run"), "--rouge-examples", "2"]).exit_code == 0
    assert len(spy) > n and all(end[0] in call["stops"] for call in spy[n:])  # and lora eval's
    _generate(tmp_path / "run", "--prompt", QUESTION, "--max-new-tokens", 4, "--system", "Be brief.")
    assert spy[-1]["ids"] == _training_prompt(tok, tok.chat_template, "Be brief.")
    _generate(tmp_path / "run", "--prompt", QUESTION, "--max-new-tokens", 4, "--no-chat")
    assert spy[-1]["ids"] == tok.encode_prompt(QUESTION)
