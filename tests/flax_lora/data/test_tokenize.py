"""Token ids with a loss mask: the prompt is context, the target (+ eos) is learned."""

from __future__ import annotations

from flax_lora.data.tokenize import tokenize


def test_tokenize_masks_prompt_and_truncates_keeping_the_answer():
    from flax_lora.demo import build_tokenizer

    tok = build_tokenizer()
    (ex,) = tokenize([("reverse 1 2 3 4 :", " four three two one")], tok, 16)
    assert ex.prompt_len == 6 and ex.loss_mask.tolist() == [0] * 6 + [1] * 5  # 4 words + eos
    (short,) = tokenize([("reverse 1 2 3 4 :", " four three two one")], tok, 8)
    # too long: the target keeps half the budget, the prompt loses its start (keeps the ":")
    assert len(short.ids) == 8 and short.loss_mask.sum() == 4 and short.ids[3] == tok.convert_tokens_to_ids(":")
    assert short.truncated and not ex.truncated
