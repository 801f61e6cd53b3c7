"""PyTorch + PEFT baseline: steady-state LoRA training tokens/s for a Llama shape.

The reference a user would otherwise run: transformers' LlamaForCausalLM (random init from
the same shape), PEFT LoRA on the same targets, AdamW, one optimizer step per batch,
eager mode. Used by ``benchmarks/bench.py`` when torch and peft are importable.
"""

from __future__ import annotations

import time
from typing import Any


def run_torch(shape: dict[str, Any], *, batch: int, seq: int, r: int, alpha: float,
              targets: list[str], precision: str, steps: int, warmup: int, seed: int = 0) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
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
    if precision == "bf16":  # PEFT keeps adapters in fp32 like our trainer (autocast_adapter_dtype)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.train()
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
    step(); sync()
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
        "first_step_seconds": first, "peak_memory_gb": peak, "loss": float(loss),
        "torch": torch.__version__,
    }
