"""The advisor's contract: the request it takes and the advice it gives (JSON on disk).

Field names here are stable: `lora train --from-advice` and user scripts read them.
Bump SCHEMA_VERSION on any incompatible change.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from advisor.sizes import parse_size

SCHEMA_VERSION = "1"

Task = Literal[
    "classification",
    "extraction",
    "qa",
    "generation",
    "summarization",
    "chat",
    "reasoning",
    "domain-adaptation",
    "medical",
    "legal",
    "technical",
]
TextLength = Literal["short", "medium", "long", "very-long"]
Style = Literal["conservative", "standard", "aggressive"]
RecipeName = Literal["quick", "balanced", "max-quality", "memory-constrained"]
Schedule = Literal["constant", "linear", "cosine"]
Precision = Literal["bf16", "fp32"]
Quantization = Literal["none", "int8", "nf4", "nf4-dq"]  # nf4: QLoRA's NormalFloat-4 (not in the guide)
TargetPreset = Literal["attention-qv", "attention", "attention-mlp"]
# What the trainer does with a data row it cannot use, and with a non-finite loss.
RowPolicy = Literal["skip", "fail"]
# --format: how rows are read (advisor.formats)
DataFormat = Literal["prompt-completion", "alpaca", "chat", "sharegpt", "text"]
DivergencePolicy = Literal["stop", "halve-lr"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdviceRequest(_Strict):
    """What the user knows: data size, task, GPU and, optionally, model and data file.

    Explicit values (r, epochs, ...) override whatever the rules or a recipe choose.
    """

    samples: PositiveInt | None = None
    vram_gb: float = Field(gt=0)
    task: Task = "generation"
    model: str | None = None
    model_params: float | None = Field(default=None, gt=0, description="size class when the model is unknown")
    max_length: PositiveInt | None = None
    text_length: TextLength | None = None
    noisy: bool = False
    style: Style | None = None
    recipe: RecipeName | None = None
    gpus: PositiveInt = 1
    data: str | None = None
    data_format: DataFormat | None = None  # --format (default: detected from the columns)
    input_field: str | None = None
    target_field: str | None = None
    chat_template: str | None = None  # a template file or "chatml" (default: the tokenizer's)
    # Explicit overrides (flags win over recipes and rules).
    r: PositiveInt | None = None
    alpha: float | None = Field(default=None, gt=0)
    dropout: float | None = Field(default=None, ge=0, lt=1)
    epochs: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    gradient_accumulation_steps: PositiveInt | None = None
    learning_rate: float | None = Field(default=None, gt=0, lt=1)
    lr_schedule: Schedule | None = None
    warmup_steps: int | None = Field(default=None, ge=0)
    target_modules: tuple[str, ...] | TargetPreset | None = None
    quantization: Quantization | None = None
    precision: Precision | None = None
    gradient_checkpointing: bool | None = None  # None: only when batch 1 does not fit without it
    shard_frozen: bool | None = None  # None: with several GPUs, when a full copy of the frozen weights does not fit
    packing: bool | None = None  # None: when the data is short for max_length and the model can (advisor.rules)

    @field_validator("model_params", mode="before")
    @classmethod
    def _size(cls, value):
        """Accept size classes like "1.3B" or "350M" as well as plain counts."""
        return None if value is None else parse_size(value)

    @model_validator(mode="after")
    def _need_size(self) -> "AdviceRequest":
        if self.samples is None and self.data is None:
            raise ValueError("give the number of samples (--samples) or a data file (--data)")
        return self


class ModelShape(_Strict):
    """The architecture facts the memory model and target resolution need."""

    name: str
    source: Literal["catalog", "config", "size-class", "reference"]
    model_type: str
    params: int
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    tied_embeddings: bool
    attention_modules: tuple[str, ...] = ()
    mlp_modules: tuple[str, ...] = ()


class LoraAdvice(_Strict):
    r: PositiveInt
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    target_preset: TargetPreset | None = None
    scaling: float
    use_rslora: bool = False


class TrainingAdvice(_Strict):
    epochs: PositiveInt
    per_device_batch_size: PositiveInt
    gradient_accumulation_steps: PositiveInt
    effective_batch_size: PositiveInt
    gpus: PositiveInt = 1
    learning_rate: float
    lr_schedule: Schedule = "constant"
    warmup_steps: int = 0
    max_length: PositiveInt
    precision: Precision
    quantization: Quantization = "none"
    gradient_checkpointing: bool = False  # lora train --remat
    packing: bool = False  # lora train --packing: several examples per row
    shard_frozen: bool = False  # lora train --shard-frozen: frozen weights split over the GPUs
    total_steps: PositiveInt
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0


class MemoryEstimate(_Strict):
    total_gb: float
    breakdown_gb: dict[str, float]
    vram_gb: float
    fits: bool
    headroom_gb: float
    assumptions: tuple[str, ...] = ()


class DataStats(_Strict):
    path: str
    samples: int
    length_unit: Literal["tokens", "estimated-tokens"]
    tokenizer: str | None = None
    chars_per_token: float | None = None
    p50: int
    p95: int
    max: int
    truncated_at_max_length: int
    format: str | None = None  # as detected, e.g. "chat(messages)"
    chat_template: str | None = None  # where a chat's template came from
    skipped_rows: int = 0
    windows: int | None = None  # a text corpus: the examples its documents become at max_length


class Reason(_Strict):
    field: str
    value: str
    why: str


class Advice(_Strict):
    schema_version: str = SCHEMA_VERSION
    request: AdviceRequest
    model: ModelShape
    lora: LoraAdvice
    training: TrainingAdvice
    memory: MemoryEstimate
    trainable_params: int
    data: DataStats | None = None
    reasons: tuple[Reason, ...]
    warnings: tuple[str, ...] = ()

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Advice":
        return cls.model_validate_json(text)
