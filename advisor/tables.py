"""Every table, rule list and recipe of the configuration guide, as data, in one place.

Source: ``configuration-guide.md`` (section names are quoted in each constant's comment and in
the advice's reasons). The rules in ``advisor.rules`` only *read* these; tests pin every row.
Where the guide is silent (e.g. rank for "qa"/"chat") the entry says so in its ``why`` text.
"""

from __future__ import annotations

from typing import NamedTuple

GUIDE = "configuration guide"

# "Rank (r)" table: rank -> (trainable params range, memory, use case).
RANK_TABLE: dict[int, tuple[str, str, str]] = {
    4: ("~0.1-0.5M", "Low", "Quick experiments, simple tasks"),
    8: ("~0.5-2M", "Moderate", "General purpose, balanced performance"),
    16: ("~2-8M", "Higher", "Complex tasks, significant adaptation"),
    32: ("~8-32M", "High", "Maximum quality, specialized domains"),
}

# "Choosing rank": task -> (r, the guide's line it comes from).
RANK_BY_TASK: dict[str, tuple[int, str]] = {
    "classification": (4, "simple classification or entity extraction -> r = 4"),
    "extraction": (4, "simple classification or entity extraction -> r = 4"),
    "generation": (8, "general text generation or summarization -> r = 8"),
    "summarization": (8, "general text generation or summarization -> r = 8"),
    # Not named by the guide: Q&A and chat are general text generation.
    "qa": (8, "not listed; Q&A is general text generation -> r = 8"),
    "chat": (8, "not listed; chat is general text generation -> r = 8"),
    "reasoning": (16, "complex reasoning or domain adaptation -> r = 16"),
    "domain-adaptation": (16, "complex reasoning or domain adaptation -> r = 16"),
    "medical": (32, "specialized medical/legal/technical domains -> r = 32"),
    "legal": (32, "specialized medical/legal/technical domains -> r = 32"),
    "technical": (32, "specialized medical/legal/technical domains -> r = 32"),
}

# "Alpha": style -> alpha / r.
ALPHA_STYLES: dict[str, float] = {"conservative": 1.0, "standard": 2.0, "aggressive": 4.0}
DEFAULT_STYLE = "standard"  # the guide's "Standard (recommended)"


class SizeRow(NamedTuple):
    """A dataset-size row: applies to ``low <= samples < high`` (``high`` None = unbounded)."""

    low: int
    high: int | None
    label: str


# "Dropout" values and "Choosing dropout" rules.
DROPOUT_VALUES: dict[float, str] = {
    0.0: "No dropout (risk of overfitting on small datasets)",
    0.05: "Light regularization (large, diverse datasets)",
    0.1: "Standard regularization (general purpose)",
    0.2: "Heavy regularization (small or noisy datasets)",
}
DROPOUT_BY_SIZE: tuple[tuple[SizeRow, float], ...] = (
    (SizeRow(0, 5_000, "small dataset (< 5k samples)"), 0.2),
    (SizeRow(5_000, 50_001, "medium dataset (5k-50k samples)"), 0.1),
    (SizeRow(50_001, None, "large dataset (> 50k samples), clean data"), 0.05),
)
DROPOUT_NOISY = 0.2  # "Small (< 5k samples) or noisy data -> 0.2"

# "Number of Epochs": dataset size -> (min, max) epochs. The guide's rows share their borders
# (1,000 and 5,000 and 50,000 appear in two rows); a border belongs to the row it starts.
EPOCHS_BY_SIZE: tuple[tuple[SizeRow, tuple[int, int]], ...] = (
    (SizeRow(0, 1_000, "< 1,000 samples"), (5, 10)),
    (SizeRow(1_000, 5_000, "1,000-5,000"), (3, 7)),
    (SizeRow(5_000, 50_001, "5,000-50,000"), (3, 5)),
    (SizeRow(50_001, None, "> 50,000"), (1, 3)),
)
# Open-ended rows need a second anchor for the log interpolation: below 100 samples the top
# of the "< 1,000" row applies, from 500,000 samples the bottom of the "> 50,000" row.
EPOCHS_OPEN_LOW = 100
EPOCHS_OPEN_HIGH = 500_000


class BatchRow(NamedTuple):
    vram_gb: float
    model_size: str
    max_batch: tuple[int, int]


# "Batch Size" -> "Memory constraints" table.
BATCH_BY_VRAM: tuple[BatchRow, ...] = (
    BatchRow(8, "Small (< 500M params)", (2, 4)),
    BatchRow(12, "Small-Medium", (4, 8)),
    BatchRow(16, "Medium (1-3B params)", (4, 8)),
    BatchRow(24, "Large (7B params)", (8, 16)),
)
# "Effective batch size" example: 4 x 4 = 16; "Gradient Accumulation": steps = 4.
TARGET_EFFECTIVE_BATCH = 16
DEFAULT_GRAD_ACCUMULATION = 4

# "Learning Rate" -> "Common values".
LEARNING_RATES: dict[float, str] = {
    1e-5: "Very conservative, large models",
    5e-5: "Conservative, stable training",
    1e-4: "Moderate, good starting point",
    2e-4: "Standard for LoRA (recommended)",
    5e-4: "Aggressive, small models",
    1e-3: "Very aggressive, risk of instability",
}
DEFAULT_LEARNING_RATE = 2e-4
# "Large (7B params)" in the batch table; published "7B" models have 6.7-7.6B (GPT-J: 6.05B).
LARGE_MODEL_PARAMS = 6e9
LARGE_MODEL_LEARNING_RATE = 1e-4
# "The tool uses a constant learning rate" (+ linear, cosine, warmup + decay for advanced use).
DEFAULT_SCHEDULE = "constant"
WARMUP_FRACTION = 0.05  # for decaying schedules only; the guide gives no number

# "Maximum Sequence Length" -> "Choosing max length".
MAX_LENGTH_BY_TEXT: dict[str, tuple[int, str]] = {
    "short": (128, "Short texts (tweets, titles, Q&A)"),
    "medium": (512, "Medium texts (paragraphs, summaries)"),
    "long": (1024, "Long texts (articles, documents)"),
    "very-long": (2048, "Very long texts (research papers)"),
}
DEFAULT_TEXT_LENGTH = "medium"
LENGTH_MULTIPLE = 64  # data-derived max_length is rounded up to this
LENGTH_PERCENTILE = 95

# "Target Modules" -> "Common patterns" (the guide's own names, llama/OPT style).
TARGET_PRESETS: dict[str, tuple[tuple[str, ...], str]] = {
    "attention-qv": (("q_proj", "v_proj"), "Attention layers only (memory efficient)"),
    "attention": (("q_proj", "k_proj", "v_proj", "o_proj"), "Full attention (recommended)"),
    "attention-mlp": (
        ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
        "Attention + MLP (maximum adaptation)",
    ),
}
DEFAULT_TARGET_PRESET = "attention"

# "Mixed Precision (FP16)": the guide enables fp16 on CUDA; we use bf16 (see RESOLUTIONS.md).
DEFAULT_PRECISION = "bf16"
# "Model Quantization": load_in_8bit for very large models; off unless the model does not fit.
DEFAULT_QUANTIZATION = "none"


class Recipe(NamedTuple):
    name: str
    title: str
    samples: int
    max_length: int
    r: int
    alpha: float
    dropout: float
    epochs: int
    batch_size: int
    learning_rate: float
    best_for: str


# "Configuration Recipes" 1-4, verbatim.
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("quick", "Quick Experimentation", 1000, 256, 4, 16, 0.1, 3, 4, 2e-4,
               "Testing ideas, rapid iteration"),
        Recipe("balanced", "Balanced Quality", 10000, 512, 8, 32, 0.1, 3, 8, 2e-4,
               "Production models, general tasks"),
        Recipe("max-quality", "Maximum Quality", 50000, 1024, 16, 64, 0.1, 3, 8, 1e-4,
               "Specialized domains, publication-quality results"),
        Recipe("memory-constrained", "Memory-Constrained", 5000, 256, 4, 16, 0.1, 5, 2, 2e-4,
               "Limited GPU memory (< 8GB)"),
    )
}
LOW_VRAM_RECIPE = "memory-constrained"  # its "Best for" covers GPUs below the batch table's 8 GB


def size_row(rows, samples: int):
    """The (row, value) pair of a size table whose range holds ``samples``."""
    for row, value in rows:
        if samples >= row.low and (row.high is None or samples < row.high):
            return row, value
    raise ValueError(f"no row for {samples} samples")  # tables cover [0, inf)
