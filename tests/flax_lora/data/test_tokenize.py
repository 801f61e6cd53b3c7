"""Rows as token ids with a loss mask (the advisor's path, used by the trainer): targets (+ EOS)
trained, prompts not; a long pair keeps its answer; a long document becomes windows that train
every token once."""

from __future__ import annotations

import numpy as np

from advisor.examples import encode, fit, render_row
from advisor.formats import Format


def _pair(tok, prompt, target):
    return encode(render_row({"prompt": prompt, "completion": target}, Format("pair", "prompt", "completion")), tok)


def test_tokenize_masks_prompt_and_truncates_keeping_the_answer():
    from flax_lora.demo import build_tokenizer

    tok = build_tokenizer()
    ex = _pair(tok, "reverse 1 2 3 4 :", " four three two one")
    assert ex.prompt_len == 6 and ex.loss_mask.tolist() == [0] * 6 + [1] * 5  # 4 words + eos
    (kept,) = fit(ex, 16, "pair")
    assert kept is ex and not kept.truncated
    (short,) = fit(ex, 8, "pair")
    # too long: the target keeps half the budget, the prompt loses its start (keeps the ":")
    assert len(short.ids) == 8 and short.loss_mask.sum() == 4 and short.ids[3] == tok.token_id(":")
    assert short.truncated and short.prompt_len == 4


def test_a_long_document_becomes_windows_that_train_every_token_once():
    from flax_lora.demo import build_tokenizer

    tok = build_tokenizer()
    words = " ".join(str(i % 10) for i in range(40))
    ex = encode(render_row({"text": words}, Format("text", None, "text")), tok)
    assert len(ex.ids) == 41 and ex.loss_mask.tolist() == [1] * 41  # 40 words + EOS
    windows = fit(ex, 16, "text")
    assert [len(w.ids) for w in windows] == [16, 16, 11]
    # each token after the first is a target exactly once; the overlap token is context only
    starts = [0, 15, 30]
    trained = np.zeros(41, int)
    for s, w in zip(starts, windows):
        np.testing.assert_array_equal(w.ids, ex.ids[s:s + len(w.ids)])
        trained[s:s + len(w.ids)] += w.loss_mask
    assert trained[1:].tolist() == [1] * 40
    assert all(w.target == "" for w in windows)  # nothing to compare generations with
