"""The adapter records the shortest PEFT target names that select exactly what was adapted."""

from __future__ import annotations

from flax_lora.lora import LinearInfo
from flax_lora.targets import resolve_targets, shortest_names


def _linears(paths):
    return {p: LinearInfo(p, "dense", 8, 8) for p in paths}


LLAMA = _linears([f"model/layers/{i}/{m}" for i in range(3) for m in
                  ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                   "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")] + ["lm_head"])
GPT2 = _linears([f"transformer/h/{i}/{m}" for i in range(2) for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")])


def test_leaf_names_when_they_are_exact():
    targets = resolve_targets(LLAMA, "llama", preset="attention")
    assert shortest_names(targets, LLAMA) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_two_levels_when_a_leaf_name_is_shared():
    targets = resolve_targets(GPT2, "gpt2", preset="attention")
    assert shortest_names(targets, GPT2) == ["attn.c_attn", "attn.c_proj"]
    everything = resolve_targets(GPT2, "gpt2", preset="attention-mlp")
    assert shortest_names(everything, GPT2) == ["c_attn", "c_fc", "c_proj"]


def test_full_paths_when_only_some_layers_are_adapted():
    some = [f"model/layers/0/self_attn/{m}" for m in ("q_proj", "v_proj")]
    assert shortest_names(some, LLAMA) == sorted(some)
