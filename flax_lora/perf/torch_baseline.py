"""PyTorch + PEFT baseline: steady-state LoRA training tokens/s for a Llama shape.

The reference a user would otherwise run: transformers' ``LlamaForCausalLM`` (random init from
the same shape), PEFT LoRA on the same targets, AdamW, one optimizer step per batch, eager
mode, ``sdpa`` attention.

torch and peft are optional, benchmark-only dependencies: this module imports them only inside
:func:`run_torch`, and importing it imports neither them nor jax. The benchmarks call
:func:`run_torch_subprocess`, which runs this module in a fresh interpreter
(``python -m flax_lora.perf.torch_baseline KWARGS_JSON``, printing ``RESULT <json>``) so that
neither framework holds the other's threads or device memory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def torch_available() -> bool:
    """Whether torch and peft are importable (without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "peft"))


def _peft_model(shape: dict[str, Any], *, seq, r, alpha, targets, dtype, device):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"], head_dim=shape["head_dim"],
        max_position_embeddings=max(seq, 2048), tie_word_embeddings=shape["tied_embeddings"],
        attn_implementation="sdpa",
    )
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    if dtype == torch.bfloat16:  # PEFT keeps adapters in fp32 like our trainer (autocast_adapter_dtype)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.train()
    return model


def run_torch(shape: dict[str, Any], *, batch: int, seq: int, r: int, alpha: float,
              targets: list[str], precision: str, steps: int, warmup: int, seed: int = 0) -> dict:
    """Time ``steps`` training steps after ``warmup`` (the first included) on random tokens."""
    import torch

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    model = _peft_model(shape, seq=seq, r=r, alpha=alpha, targets=targets, dtype=dtype, device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, shape["vocab"], (batch, seq), generator=g).to(device)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {
        "impl": "torch+peft", "device": device, "precision": precision,
        "tokens_per_second": batch * seq * steps / dt, "step_seconds": dt / steps,
        "first_step_seconds": first, "peak_memory_gb": peak, "loss": float(loss.detach()),
        "torch": torch.__version__,
    }


def run_torch_subprocess(shape: dict[str, Any], *, timeout: float, **kwargs) -> dict:
    """:func:`run_torch` (same keyword arguments) in a fresh interpreter; an ``error`` entry on failure.

    The child imports this very copy of the package: its parent directory goes first on the
    child's ``PYTHONPATH``.
    """
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "flax_lora.perf.torch_baseline", json.dumps({"shape": shape, **kwargs})]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"impl": "torch+peft", "precision": kwargs.get("precision"), "error": f"timeout after {timeout}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"impl": "torch+peft", "precision": kwargs.get("precision"),
            "error": (proc.stderr or proc.stdout)[-2000:]}


def main(argv: list[str] | None = None) -> int:
    """``python -m flax_lora.perf.torch_baseline KWARGS_JSON``: print ``RESULT`` and run_torch's JSON."""
    argv = sys.argv[1:] if argv is None else argv
    print("RESULT " + json.dumps(run_torch(**json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
