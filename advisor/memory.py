"""Training-memory model for LoRA from a model's shape (per GPU; gradient checkpointing optional).

Checked against XLA's compiled memory analysis of the real train step
(``benchmarks/memory_check.py``, table in ``benchmarks/RESULTS.md``), on the CPU and, for
explicit attention, in XLA's deviceless compile for an H200 (``--gpu h200``), which matched
the H200's measured peak.

The guide says "Memory ∝ batch_size × max_length²". That holds for the attention-score term
only. Everything else that grows with the batch (hidden states, MLP activations, logits) grows
*linearly* in max_length and dominates until T passes ``quadratic_crossover`` — for GPT-2 and
most 1-8B models that is thousands of tokens. Weights and optimizer state do not grow at all.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from advisor.catalog import ARCHS, linear_layers, name_matches
from advisor.schema import MemoryEstimate, ModelShape

GIB = 2**30
BYTES = {"bf16": 2, "fp32": 4}
RUNTIME_FIXED_GB = 0.75  # CUDA/XLA context, cuBLAS workspaces, compiled programs
RUNTIME_FRACTION = 0.10  # allocator fragmentation and XLA temporaries, of everything else
INT8_SCALE_BYTES = 4  # one fp32 scale per output row of each quantized linear (LLM.int8 style)
ADAM_STATES = 2  # AdamW keeps m and v, fp32
# trained through the project's own ports (flax_lora.models.decoder and .gpt2: chunked loss, scan, remat);
# the other families through transformers' Flax classes, the legacy extra (tested to agree with the ports' lists)
PORT_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3", "olmo2",
              "gpt2")
FUSED_LOSS_TYPES = PORT_TYPES
SOFTCAPPED_ATTENTION = ("gemma2",)  # tanh-capped scores: no fused kernel takes them, one more T^2 buffer
NORM_EXTRAS = {  # per-token elements more than Llama's layer saves: Gemma's two extra norms, q/k norms
    "gemma2": lambda q, kv, h: 2 * h, "gemma3_text": lambda q, kv, h: 2 * h + q + kv,
    "qwen3": lambda q, kv, h: q + kv, "olmo2": lambda q, kv, h: q + kv}
NF4_BYTES = {"nf4": 0.5 + 4 / 64, "nf4-dq": 0.5 + 1 / 64 + 4 / (64 * 256)}  # per weight, scales included
# softmax in float32 with bf16 weights: the ports, and transformers' Flax BLOOM (attention_softmax_in_fp32)
FP32_SOFTMAX_TYPES = PORT_TYPES + ("bloom",)
FUSED_CHUNK_BYTES = 128 * 2**20  # flax_lora.training.losses.TARGET_CHUNK_BYTES (tested to agree)


class Setup(NamedTuple):
    """What the memory depends on besides the shape."""

    r: int
    targets: tuple[str, ...]
    batch: int
    max_length: int
    precision: str = "bf16"
    quantization: str = "none"
    remat: bool = False  # gradient checkpointing per decoder layer
    attention: str = "auto"  # "auto": flash where the Llama port picks it (GPU, bf16); "explicit": T^2 scores
    scan: bool | None = None  # layers as one scan; None: as `lora train` loads them (the port scans, others don't)
    device: str = "gpu"  # "cpu": XLA:CPU (benchmarks/memory_check.py), which has no flash and no relayout copy
    packing: bool = False  # lora train --packing: packed rows take explicit T^2 scores, also on GPUs (no flash)
    gpus: int = 1
    shard_frozen: bool = False  # lora train --shard-frozen: the frozen weights split over the gpus


def trainable_params(shape: ModelShape, r: int, targets: tuple[str, ...]) -> int:
    """Exact LoRA parameters: r * (in + out) for every targeted linear, over all layers."""
    per_layer = sum(r * (n_in + n_out) for name, n_in, n_out in linear_layers(shape)
                    if any(name_matches(name, t) for t in targets))
    return shape.n_layers * per_layer


def frozen_weight_bytes(shape: ModelShape, precision: str, quantization: str) -> float:
    """Frozen base weights: all in the compute dtype, or quantized decoder linears + their scales.

    int8 (as ``load_in_8bit``: a byte per weight, an fp32 scale per output row) and nf4 / nf4-dq
    (QLoRA: 4 bits per weight, an fp32 absmax per 64 weights, or 8-bit absmaxes in blocks of 256)
    quantize only the decoder linears; embeddings, head and position tables stay in the compute
    dtype (``flax_lora.quant``, ``flax_lora.nf4``).
    """
    dtype = BYTES[precision]
    if quantization == "none":
        return shape.params * dtype
    linears = linear_layers(shape)
    q_params = shape.n_layers * sum(i * o for _, i, o in linears)
    if quantization == "int8":
        quantized = q_params * 1 + shape.n_layers * sum(o for _, _, o in linears) * INT8_SCALE_BYTES
    else:
        quantized = q_params * NF4_BYTES[quantization]
    return quantized + (shape.params - q_params) * dtype


def layer_frozen_bytes(shape: ModelShape, precision: str, quantization: str) -> float:
    """One decoder layer's linear weights in the run's format: what a split (FSDP) run gathers onto
    every GPU while that layer computes. Norms are left out (a few hidden-sized vectors)."""
    linears = linear_layers(shape)
    weights = sum(i * o for _, i, o in linears)
    if quantization == "none":
        return weights * BYTES[precision]
    if quantization == "int8":
        return weights + sum(o for _, _, o in linears) * INT8_SCALE_BYTES
    return weights * NF4_BYTES[quantization]


def frozen_parts(shape: ModelShape, s: "Setup") -> dict[str, float]:
    """The frozen weights per GPU: a full copy, or with ``shard_frozen`` over several GPUs
    (``flax_lora.training.parallel``: every tensor split along one dimension, made in place when
    loading) 1/gpus of them plus one layer gathered at a time (``frozen_gathered``: XLA
    all-gathers a layer's weights where it computes and frees them after; an upper bound, the
    XLA:CPU compile of Llama-3.2-1B's step over 8 devices showed no more temporaries than the
    replicated step's, benchmarks/RESULTS.md)."""
    frozen = frozen_weight_bytes(shape, s.precision, s.quantization)
    if not s.shard_frozen or s.gpus < 2:
        return {"frozen_weights": frozen}
    return {"frozen_weights": frozen / s.gpus,
            "frozen_gathered": layer_frozen_bytes(shape, s.precision, s.quantization)}


def activation_elements_per_token(shape: ModelShape, r: int, n_targets: int) -> int:
    """Elements saved for the backward pass per token per layer, excluding attention scores.

    Residual input, two norm outputs, the attention output (4h); q, k, v; the MLP's
    pre-activation(s) and activated output (2 x intermediate, 3 x when gated), except in the
    project's Llama port, which recomputes act(gate) * up in the backward pass and keeps only
    gate and up (2 x); r per LoRA module for its A·x.
    """
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    gated = ARCHS[shape.model_type].gated_mlp
    mlp = (2 if not gated or shape.model_type in PORT_TYPES else 3) * shape.intermediate
    extra = NORM_EXTRAS.get(shape.model_type, lambda q, kv, h: 0)(q, kv, shape.hidden)
    return 4 * shape.hidden + q + 2 * kv + mlp + r * n_targets + extra


def quadratic_crossover(shape: ModelShape, r: int = 8, n_targets: int = 4, precision: str = "bf16",
                        flash: bool | None = None) -> int | None:
    """The max_length above which the T² attention scores outweigh all per-token terms
    (None: flash attention keeps no T² term at all; ``flash`` None: ``fused_attention``)."""
    if fused_attention(shape, precision) if flash is None else flash:
        return None
    per_token = shape.n_layers * activation_elements_per_token(shape, r, n_targets) * BYTES[precision]
    per_token += 8 * shape.vocab  # fp32 logits + their gradient
    return math.ceil(per_token / (shape.n_layers * attention_bytes_per_token(shape, 1, precision, False)))


def fused_attention(shape: ModelShape, precision: str) -> bool:
    """Whether training uses flash attention (no T² scores): the project's decoder port picks
    cuDNN's fused kernel on GPUs in bf16 for head sizes cuDNN takes
    (``flax_lora.models.decoder._fused_attention``), except for soft-capped scores (Gemma 2); other
    families materialise the scores."""
    return (shape.model_type in FUSED_LOSS_TYPES and shape.model_type not in SOFTCAPPED_ATTENTION
            and precision == "bf16" and shape.head_dim % 8 == 0 and shape.head_dim <= 128)


def uses_flash(shape: ModelShape, s: Setup) -> bool:
    """Whether this setup trains with flash attention: ``fused_attention``, on a GPU, unless
    explicit scores were asked for (``LORA_ATTENTION=xla``) or rows are packed: the port confines
    a packed row's attention to each example with explicit segment-masked scores on every backend
    (jax has no maintained segment-aware flash kernel; ``flax_lora.models.decoder._fused_attention``).
    A packed row is otherwise a full ``max_length`` row, which every other term already assumes.
    """
    if s.attention not in ("auto", "explicit") or s.device not in ("gpu", "cpu"):
        raise ValueError(f"attention must be 'auto' or 'explicit', device 'gpu' or 'cpu': {s.attention!r}, {s.device!r}")
    return s.attention == "auto" and s.device == "gpu" and not s.packing and fused_attention(shape, s.precision)


def attention_bytes_per_token(shape: ModelShape, max_length: int, precision: str, flash: bool | None = None) -> float:
    """One layer's attention memory per token, or, with flash attention, only its float32
    log-sum-exp per head (``flash`` None: ``fused_attention``).

    Explicit attention: the backward keeps two [B, H, T, T] buffers per layer, the softmax's
    exponentials and the normalised probabilities (the P·V matmul's operand). The project's ports
    (the decoder port, GPT-2's) and transformers' Flax BLOOM take the softmax in float32 and cast
    the probabilities to the compute dtype (4 + 2 bytes in bf16, 4 + 4 in fp32); transformers' other
    Flax classes (OPT, GPT-Neo, GPT-J: the legacy extra) take it in the compute dtype (2 + 2 in
    bf16). Checked in XLA's compile for an H200 (the decoder port: ``benchmarks/memory_check.py
    --gpu h200``; OPT, BLOOM and transformers' GPT-2 before the GPT-2 port).
    """
    if fused_attention(shape, precision) if flash is None else flash:
        return shape.n_heads * 4.0
    softmax = 4 if shape.model_type in FP32_SOFTMAX_TYPES else BYTES[precision]
    capped = 4 if shape.model_type in SOFTCAPPED_ATTENTION else 0  # the float32 scores before tanh
    return shape.n_heads * max_length * (softmax + BYTES[precision] + capped)


def scan_relayout_bytes_per_token(shape: ModelShape, s: Setup) -> float:
    """The copy XLA:GPU makes of the scanned layers' float32 probabilities, per token.

    With the layers as one scan, the forward loop stacks every layer's [B, H, T, T] float32
    probabilities in the score matmul's output layout and the backward loop reads them in
    another, so XLA transposes the whole stack (L layers) between the two loops; the copy and
    the original are live together. Seen in the H200 compile of the Llama port (4 x 2048,
    bf16: 32 GiB of probabilities, transposed once; the bf16 stack after it, when the float32
    one is freed). Not on XLA:CPU, not for unrolled layers, not with remat (only layer inputs
    are stacked) and not with flash attention (no T^2 buffer). ``Setup.scan`` None: the
    Llama-family port scans its layers (as ``lora train`` loads it), transformers' Flax classes
    cannot.
    """
    scan = shape.model_type in PORT_TYPES if s.scan is None else s.scan
    if not scan or s.remat or s.device != "gpu" or uses_flash(shape, s):
        return 0.0
    return shape.n_layers * shape.n_heads * s.max_length * 4.0


def activation_bytes(shape: ModelShape, s: Setup, n_targets: int) -> float:
    """Activations kept for the backward pass, plus one layer's backward temporaries.

    No remat: every layer's activations and attention probabilities, the score gradients of
    the layer being differentiated and, for scanned layers on a GPU, XLA's relayout copy of
    the stacked float32 probabilities (``scan_relayout_bytes_per_token``). Remat: each layer's
    input only, plus one layer recomputed (its activations and scores, and one fp32 score
    gradient at a time: 1.5 x the scores).
    """
    tokens = s.batch * s.max_length
    per_layer = activation_elements_per_token(shape, s.r, n_targets) * BYTES[s.precision]
    att = attention_bytes_per_token(shape, s.max_length, s.precision, uses_flash(shape, s))
    if s.remat:
        return tokens * (shape.n_layers * shape.hidden * BYTES[s.precision] + per_layer + 1.5 * att)
    return tokens * (shape.n_layers * (per_layer + att) + att + scan_relayout_bytes_per_token(shape, s))


def logits_bytes(shape: ModelShape, tokens: int) -> float:
    """The vocabulary projection's memory.

    The ports' families train with the fused chunked loss (``flax_lora.training.losses``): float32
    logits, their exponentials and gradient for one chunk (~128 MiB each) plus the float32
    gradient of the hidden states. Other families materialise float32 logits and their gradient.
    """
    if shape.model_type in FUSED_LOSS_TYPES:
        chunk = min(tokens, max(16, FUSED_CHUNK_BYTES // (4 * shape.vocab)))
        return 3.0 * chunk * shape.vocab * 4 + tokens * shape.hidden * 4.0
    return tokens * shape.vocab * 8.0


def breakdown(shape: ModelShape, s: Setup) -> dict[str, float]:
    """Bytes by category (see module docstring); runtime overhead included."""
    lora = trainable_params(shape, s.r, s.targets)
    n_targets = sum(1 for name, _, _ in linear_layers(shape) if any(name_matches(name, t) for t in s.targets))
    tokens = s.batch * s.max_length
    parts = {
        **frozen_parts(shape, s),
        "lora_params": lora * 4.0,
        "gradients": lora * 4.0,
        "optimizer_states": lora * 4.0 * ADAM_STATES,
        "activations": activation_bytes(shape, s, n_targets),
        "logits": logits_bytes(shape, tokens),
    }
    parts["runtime_overhead"] = RUNTIME_FIXED_GB * GIB + RUNTIME_FRACTION * sum(parts.values())
    return parts


def estimate(shape: ModelShape, s: Setup, vram_gb: float) -> MemoryEstimate:
    """The estimate in GiB against the GPU's memory, with the assumptions it rests on."""
    raw = breakdown(shape, s)
    total = sum(raw.values()) / GIB
    parts = {k: round(v / GIB, 3) for k, v in raw.items()}
    flash = uses_flash(shape, s)
    crossover = quadratic_crossover(shape, s.r, len(s.targets), s.precision, flash)
    return MemoryEstimate(
        total_gb=round(total, 3),
        breakdown_gb=parts,
        vram_gb=vram_gb,
        fits=total <= vram_gb,
        headroom_gb=round(vram_gb - total, 3),
        assumptions=(
            f"model shape: {shape.name} ({shape.source})",
            "GB = GiB (2^30 bytes), per GPU, as nvidia-smi reports",
            f"frozen weights in {s.precision}" + (f" with {s.quantization} decoder linears"
                                                  if s.quantization != "none" else "")
            + (f", split over {s.gpus} GPUs (--shard-frozen) plus one layer gathered at a time"
               if "frozen_gathered" in raw else "")
            + "; LoRA params, gradients and AdamW m/v in fp32",
            ("gradient checkpointing per layer" if s.remat else "no gradient checkpointing")
            + ("; flash attention (cuDNN, GPU bf16): no T^2 attention scores"
               if flash
               else "; attention probabilities materialized (batch x heads x T^2 per layer: softmax exponentials in "
               + ("fp32" if shape.model_type in FP32_SOFTMAX_TYPES else s.precision) + " + probabilities in " + s.precision + ")"
               + (", plus XLA's relayout copy of the scanned layers' fp32 probabilities"
                  if scan_relayout_bytes_per_token(shape, s) else "")),
            "chunked fused cross-entropy (no full logits)" if shape.model_type in FUSED_LOSS_TYPES
            else "logits and their gradient in fp32 (batch x T x vocab)",
            f"runtime overhead: {RUNTIME_FIXED_GB} GB context + {RUNTIME_FRACTION:.0%} of the rest",
            (f"memory grows ~linearly in max_length below T = {crossover} tokens for this model; "
             "the guide's 'batch x max_length^2' holds only above it") if crossover is not None else
            ("memory grows linearly in max_length at every length: with flash attention the "
             "guide's 'batch x max_length^2' does not apply"),
        ),
    )


def fits(shape: ModelShape, s: Setup, vram_gb: float) -> bool:
    return sum(breakdown(shape, s).values()) / GIB <= vram_gb
