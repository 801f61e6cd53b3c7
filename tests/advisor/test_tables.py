"""Every row of the guide's tables and recipes, pinned (configuration-guide.md)."""

from advisor import tables as T


def test_rank_table_rows():
    assert T.RANK_TABLE == {
        4: ("~0.1-0.5M", "Low", "Quick experiments, simple tasks"),
        8: ("~0.5-2M", "Moderate", "General purpose, balanced performance"),
        16: ("~2-8M", "Higher", "Complex tasks, significant adaptation"),
        32: ("~8-32M", "High", "Maximum quality, specialized domains"),
    }


def test_rank_by_task_follows_choosing_rank():
    ranks = {task: r for task, (r, _) in T.RANK_BY_TASK.items()}
    assert ranks == {
        "classification": 4, "extraction": 4, "generation": 8, "summarization": 8, "qa": 8,
        "chat": 8, "reasoning": 16, "domain-adaptation": 16, "medical": 32, "legal": 32,
        "technical": 32,
    }
    from typing import get_args

    from advisor.schema import Task

    assert set(ranks) == set(get_args(Task))  # every task the request accepts has a rank


def test_alpha_styles():
    assert T.ALPHA_STYLES == {"conservative": 1.0, "standard": 2.0, "aggressive": 4.0}
    assert T.DEFAULT_STYLE == "standard"


def test_dropout_values_and_size_rules():
    assert set(T.DROPOUT_VALUES) == {0.0, 0.05, 0.1, 0.2}
    cases = {1: 0.2, 4_999: 0.2, 5_000: 0.1, 50_000: 0.1, 50_001: 0.05, 10**7: 0.05}
    for samples, dropout in cases.items():
        assert T.size_row(T.DROPOUT_BY_SIZE, samples)[1] == dropout, samples
    assert T.DROPOUT_NOISY == 0.2


def test_epoch_rows():
    cases = {1: (5, 10), 999: (5, 10), 1_000: (3, 7), 4_999: (3, 7), 5_000: (3, 5),
             50_000: (3, 5), 50_001: (1, 3)}
    for samples, epochs in cases.items():
        assert T.size_row(T.EPOCHS_BY_SIZE, samples)[1] == epochs, samples


def test_batch_by_vram_rows():
    assert [(r.vram_gb, r.model_size, r.max_batch) for r in T.BATCH_BY_VRAM] == [
        (8, "Small (< 500M params)", (2, 4)),
        (12, "Small-Medium", (4, 8)),
        (16, "Medium (1-3B params)", (4, 8)),
        (24, "Large (7B params)", (8, 16)),
    ]
    assert T.TARGET_EFFECTIVE_BATCH == 16 and T.DEFAULT_GRAD_ACCUMULATION == 4


def test_learning_rate_rows():
    assert sorted(T.LEARNING_RATES) == [1e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3]
    assert T.LEARNING_RATES[2e-4] == "Standard for LoRA (recommended)"
    assert T.DEFAULT_LEARNING_RATE == 2e-4 and T.LARGE_MODEL_LEARNING_RATE == 1e-4
    assert T.DEFAULT_SCHEDULE == "constant"


def test_max_length_classes():
    assert {k: v for k, (v, _) in T.MAX_LENGTH_BY_TEXT.items()} == {
        "short": 128, "medium": 512, "long": 1024, "very-long": 2048}


def test_target_presets_use_the_guides_names():
    assert T.TARGET_PRESETS["attention-qv"][0] == ("q_proj", "v_proj")
    assert T.TARGET_PRESETS["attention"][0] == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert T.TARGET_PRESETS["attention-mlp"][0] == ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
    assert T.DEFAULT_TARGET_PRESET == "attention"


def test_precision_and_quantization_defaults():
    assert T.DEFAULT_PRECISION == "bf16" and T.DEFAULT_QUANTIZATION == "none"


def test_recipes_verbatim():
    rows = {name: (r.samples, r.max_length, r.r, r.alpha, r.dropout, r.epochs, r.batch_size, r.learning_rate)
            for name, r in T.RECIPES.items()}
    assert rows == {
        "quick": (1000, 256, 4, 16, 0.1, 3, 4, 2e-4),
        "balanced": (10000, 512, 8, 32, 0.1, 3, 8, 2e-4),
        "max-quality": (50000, 1024, 16, 64, 0.1, 3, 8, 1e-4),
        "memory-constrained": (5000, 256, 4, 16, 0.1, 5, 2, 2e-4),
    }
    # The conflict RESOLUTIONS.md resolves: every recipe is alpha = 4r, the "standard" style 2r.
    assert all(r.alpha == 4 * r.r for r in T.RECIPES.values())
