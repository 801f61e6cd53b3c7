"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64  # the tiny models' vocabulary (conftest.tiny_models)


def copy_batch(n: int, half: int = 8, seed: int = 0):
    """A learnable batch: the second half of each row copies the first; targets are the copy."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (n, 2 * half))
    ids[:, half:] = ids[:, :half]
    loss_mask = np.zeros_like(ids)
    loss_mask[:, half:] = 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}


# Tests compile hundreds of small programs that then run for milliseconds: XLA's LLVM backend at
# optimization level 1 compiles them faster than its default (the not-slow suite: 208 -> 177 s on
# 2 cores) and computes the same values. tests/conftest.py sets it before JAX starts; the
# subprocesses inherit it. Benchmarks never run with it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"


def free_port() -> int:
    """A TCP port on localhost that nothing listens on (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(jax_cache=None, **extra) -> dict[str, str]:
    """The environment for a `lora`/python subprocess: the project importable, offline, the session's
    JAX cache when given."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}
    if jax_cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(jax_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def host_devices_env(devices: int) -> dict[str, str]:
    """The environment for a subprocess that sees ``devices`` forced CPU devices and no cluster."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    for k in ("LORA_COORDINATOR", "LORA_NUM_PROCESSES", "LORA_PROCESS_ID", "SLURM_JOB_ID"):
        env.pop(k, None)
    return env


def run_config(model, data, output, **overrides):
    """A RunConfig as `lora train --model M --data D` builds it without an advice file (the advisor
    asked for this model and data), with ``overrides`` as flags; ``model``/``data`` None: the demo."""
    from flax_lora.training.config import advice_for, config_from_advice

    model, data = (None if x is None else str(x) for x in (model, data))
    advice, _ = advice_for(model, data)
    return config_from_advice(advice, model=model, data=data, output=str(output), overrides=overrides)


# Chat template styles, written after the public models' templates (structure, tokens, quirks).
CHAT_STYLES = {
    "chatml": dict(  # Qwen2.5: ChatML with a default system message
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        template=("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant."
                  "<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{{- '<|im_start|>' + message['role'] + "
                  "'\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
                  "{{- '<|im_start|>assistant\\n' }}{%- endif %}")),
    "llama3": dict(  # Llama 3: BOS in the template, headers, <|eot_id|>; the tokenizer also adds BOS
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>",
        template=("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
                  "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
                  "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                  "{%- endif %}")),
    "gemma": dict(  # Gemma: <start_of_turn>model, no system role
        specials=["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>", pad="<pad>",
        template=("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
                  "{{ raise_exception('System role not supported') }}{% endif %}{% if message['role'] == 'assistant' %}"
                  "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + "
                  "role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if "
                  "add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")),
    "mistral": dict(  # Mistral: [INST] ... [/INST] answer</s>
        specials=["<s>", "</s>", "[INST]", "[/INST]"], bos="<s>", eos="</s>", pad=None,
        template=("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                  "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                  "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")),
}
CORPUS = ["The capital of France is Paris.", "What is the capital of France?", "Two plus two is four.",
          "You are a helpful assistant.", "system user assistant model", "Tell me a joke about cats, please!",
          "Why did the cat sit on the computer? To keep an eye on the mouse."] * 20


def chat_tokenizer(style: str, folder=None):
    """A byte-level BPE tokenizer trained offline with ``style``'s special tokens and chat template
    (the BOS styles add BOS on ``tokenizer(text)``, as Llama's and Gemma's do); written to ``folder``
    as a model's tokenizer files when given."""
    import json

    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from advisor.tokenizer import Tokenizer

    s = CHAT_STYLES[style]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=s["specials"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if s["bos"]:
        bos = backend.token_to_id(s["bos"])
        backend.post_processor = processors.TemplateProcessing(single=f"{s['bos']} $A", special_tokens=[(s["bos"], bos)])
    config = {"bos_token": s["bos"], "eos_token": s["eos"], "pad_token": s["pad"], "chat_template": s["template"]}
    config = {k: v for k, v in config.items() if v}
    if folder is not None:
        from pathlib import Path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return Tokenizer(backend, config, chat_template=s["template"], name=style)


def tiny_chat_llama(folder, style: str = "llama3"):
    """A 1-layer random Llama whose folder holds a ``style`` chat tokenizer (``chat_tokenizer``)."""
    from transformers import LlamaConfig

    from flax_lora.models import hub
    from flax_lora.models.decoder import causal_lm_from_config

    tok = chat_tokenizer(style, folder)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=tok.vocab_size(), max_position_embeddings=1024,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    hub.save_pt_safetensors(folder, causal_lm_from_config(cfg, seed=0).params, cfg)
    return folder
