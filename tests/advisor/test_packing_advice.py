"""Packing advice: on for short data on the Llama-family port, a given choice wins, the steps
count packed rows, and the memory estimate counts explicit attention scores."""

from __future__ import annotations

import json
import math

from advisor import advise
from advisor.examples import Example, fit
from advisor.rules import PACKING_FILL, _example_facts

PORT = "HuggingFaceTB/SmolLM2-135M"  # a catalog Llama: the port trains it


def _data(tmp_path, chars):
    """prompt/completion rows of ``chars`` characters each (lengths estimated at 4 chars/token)."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p" * (n - 8), "completion": "c" * 8}) + "\n" for n in chars))
    return str(path)


def _reason(advice, field):
    return next(r for r in advice.reasons if r.field == field)


def test_short_data_on_the_port_is_packed_with_packed_rows_as_steps(tmp_path):
    data = _data(tmp_path, [4 * (40 + i % 60) for i in range(400)])  # 41..100 tokens, max_length 1024
    a = advise(data=data, vram_gb=80, model=PORT, max_length=1024)
    assert a.training.packing is True
    why = _reason(a, "training.packing").why
    assert "median example is" in why and "max_length 1024" in why and "not in the guide" in why
    tokens = sum(40 + i % 60 + 1 for i in range(400))  # chars / 4, + 1 (estimate_length: BOS or EOS)
    rows = math.ceil(tokens / (1024 * PACKING_FILL))
    spe = math.ceil(rows / a.training.effective_batch_size)
    assert a.training.total_steps == spe * a.training.epochs
    assert f"ceil({rows} packed rows" in _reason(a, "training.total_steps").why
    plain = advise(data=data, vram_gb=80, model=PORT, max_length=1024, packing=False)
    assert plain.training.packing is False and _reason(plain, "training.packing").why == "given"
    assert plain.training.total_steps > a.training.total_steps
    # packed rows take explicit T^2 scores on GPUs (no flash attention): more memory at the same batch
    assert any("attention probabilities materialized" in s for s in a.memory.assumptions)
    assert any("flash attention" in s for s in plain.memory.assumptions)


def test_long_data_and_other_families_are_not_packed_unless_asked(tmp_path):
    data = _data(tmp_path, [4 * 300] * 50)
    long = advise(data=data, vram_gb=80, model=PORT, max_length=1024)
    assert long.training.packing is False and _reason(long, "training.packing").why.startswith("off: the median")
    asked = advise(data=data, vram_gb=80, model=PORT, max_length=1024, packing=True)
    assert asked.training.packing is True and _reason(asked, "training.packing").why == "given"
    short = _data(tmp_path, [4 * 20] * 50)
    opt = advise(data=short, vram_gb=24, model="facebook/opt-125m", max_length=1024)  # legacy: no segment ids
    assert opt.training.packing is False
    assert "not available for model type opt" in _reason(opt, "training.packing").why
    refused = advise(data=short, vram_gb=24, model="facebook/opt-125m", packing=True)
    assert refused.training.packing is False and any("--packing would refuse" in w for w in refused.warnings)
    nodata = advise(samples=100, vram_gb=24, model=PORT)
    assert nodata.training.packing is False and "no data file" in _reason(nodata, "training.packing").why
    unknown = advise(data=short, vram_gb=24, max_length=1024)  # an assumed shape: the model may not pack
    assert unknown.training.packing is False and "not known" in _reason(unknown, "training.packing").why


def test_given_samples_scale_the_files_lengths_to_packed_rows(tmp_path):
    data = _data(tmp_path, [4 * 99] * 10)  # 100 tokens each with the EOS
    a = advise(data=data, samples=1000, vram_gb=80, model=PORT, max_length=1024)
    rows = math.ceil(1000 * 100 / (1024 * PACKING_FILL))
    assert a.training.packing is True
    assert a.training.total_steps == math.ceil(rows / a.training.effective_batch_size) * a.training.epochs
    assert "1000 samples of the data file's 100 tokens on average" in _reason(a, "training.total_steps").why


def test_example_lengths_are_the_trainers_windows_for_a_text_corpus():
    lengths = (3, 10, 37, 64, 65, 200)
    facts = _example_facts(lengths, 16, True)
    windows = [len(w.ids) for n in lengths
               for w in fit(Example(list(range(n)), [1] * n, 0, "", ""), 16, "text")]
    assert facts.count == len(windows) and facts.tokens == sum(windows)
    assert facts.over_half == sum(1 for n in windows if 2 * n > 16)
    cut = _example_facts(lengths, 16, False)
    assert cut.count == len(lengths) and cut.tokens == sum(min(n, 16) for n in lengths)
