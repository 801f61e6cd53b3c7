"""The built-in demo: a small GPT-2 trained offline, in under two minutes on 2 CPU cores.

Task: ``reverse 3 1 4 1 :`` -> ``one four one three`` (reverse four digits and spell them).
The model is random-initialised from the shipped ``demo_assets/config.json``, the word-level
tokenizer is built from ``demo_assets/vocab.txt`` with the ``tokenizers`` library, and the
data is generated from the seed. All three are written into the run directory (``model/``,
``data/``), so ``lora eval`` / ``lora generate`` / ``--resume`` treat the demo like any run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).parent / "demo_assets"
WORDS = "zero one two three four five six seven eight nine".split()
N_TRAIN, N_EVAL = 2000, 64

# What the demo sets over the advice (the guide's rules suit a pretrained model; this one is
# random-init and tiny: it learns at 1e-3 where 2e-4 barely moves it in 600 steps). The first
# two are asked of the advisor (so advice.json says so), all are applied over an advice file.
# Explicit CLI flags still win over these.
SETTINGS = {
    "max_length": 16,
    "learning_rate": 1e-3,
    "max_steps": 600,
    "log_every": 20,
    "eval_every": 100,
    "save_every": 300,
    "rouge_examples": 64,
    "max_new_tokens": 8,
}
VRAM_GB = 12.0  # the advice's nominal GPU: the demo itself runs anywhere, CPU included


def request():
    """What the demo asks the advisor: its data size, its model's shape, its two explicit values."""
    from advisor import AdviceRequest

    return AdviceRequest(samples=N_TRAIN, vram_gb=VRAM_GB, model=str(ASSETS), max_length=SETTINGS["max_length"],
                         learning_rate=SETTINGS["learning_rate"])


# The demo tokenizer's special tokens, as tokenizer_config.json holds them (transformers reads it too).
TOKENIZER_CONFIG = {"eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 64,
                    "tokenizer_class": "PreTrainedTokenizerFast"}


def build_tokenizer():
    """A whitespace word-level tokenizer over the shipped vocabulary (no download), as the project's
    :class:`advisor.tokenizer.Tokenizer`."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from advisor.tokenizer import Tokenizer

    vocab = {w: i for i, w in enumerate((ASSETS / "vocab.txt").read_text().split())}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(["<eos>", "<pad>", "<unk>"])
    return Tokenizer(backend, TOKENIZER_CONFIG, name="demo")


def save_tokenizer(tok, folder: str | Path) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json``: what a Hugging Face model folder holds."""
    from advisor.io import atomic_write_json, atomic_write_text

    folder = Path(folder)
    atomic_write_text(folder / "tokenizer.json", tok.backend.to_str())
    atomic_write_json(folder / "tokenizer_config.json", {**TOKENIZER_CONFIG, **{k: v for k, v in tok.special.items() if v}})


def make_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        d = rng.integers(0, 10, 4)
        rows.append({"prompt": "reverse " + " ".join(map(str, d)) + " :", "completion": " " + " ".join(WORDS[x] for x in d[::-1])})
    return rows


def materialize(run_dir: str | Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """Write the demo model (random init), tokenizer and data into ``run_dir``; return their paths."""
    from advisor.io import atomic_write_text
    from flax_lora.models import gpt2, hub

    run_dir = Path(run_dir)
    model_dir, data_dir = run_dir / "model", run_dir / "data"
    if not (model_dir / "model.safetensors").is_file():
        config = hub.config_from_json(json.loads((ASSETS / "config.json").read_text()), "demo")
        model = gpt2.causal_lm_from_config(config, seed=seed, source="demo")  # the project's GPT-2 port
        save_tokenizer(build_tokenizer(), model_dir)
        hub.save_pt_safetensors(model_dir, model.params, config)  # config first, weights (the marker) last
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, s in (("train.jsonl", N_TRAIN, seed), ("eval.jsonl", N_EVAL, seed + 1)):
        p = data_dir / name
        if not p.is_file():
            atomic_write_text(p, "".join(json.dumps(r) + "\n" for r in make_rows(n, s)))
        paths.append(p)
    return model_dir, paths[0], paths[1]
