"""End to end on CPU: the same SFT job run by ``lora train`` and by TRL's ``SFTTrainer`` + PEFT.

    python benchmarks/e2e.py --trl-python /work/venv-trl/bin/python --json e2e.json
    python benchmarks/e2e.py --shape tiny --steps 8 --max-length 256   # a quick check

The job, identical on both sides: a random-weight Llama checkpoint of the SmolLM2-135M shape
(``flax_lora.perf.shapes.PRESETS``; ``--shape tiny`` for a quick run) saved by PyTorch transformers'
``LlamaForCausalLM.save_pretrained``, with a word-level tokenizer built offline over a generated
vocabulary (the embedding keeps the shape's vocabulary size); a seeded prompt/completion JSONL with
an instruction-like length mix (log-normal prompts of 20-400 tokens, completions of 10-200 that
copy a span of the prompt, so there is something to learn); LoRA r 8 / alpha 16 on q/k/v/o with
dropout 0; loss on the completion tokens (and EOS) only; constant learning rate, no warmup, AdamW
with the advisor's weight decay and gradient clipping; the same steps, batch, max length, seed
and precision (fp32, and bf16 where the CPU has AVX512-BF16 or AMX-BF16); unpacked and packed
(``lora train --packing``, TRL ``packing=True``).

Measured per side, each in its own process started from here: wall time (process start to exit),
time to the end of the first step (from the process start), steady tokens/s over the steps after
the first (the first 10 when the run has at least 20: compile and warm-up stay out), counting
every non-padding token and the target tokens, peak RSS of the process tree (``wait4``'s
``ru_maxrss``), and the final train loss (target-token weighted mean over the last log window of
10 steps, as ``lora train`` logs it). ``lora train`` evaluates before and after training (loss
and ROUGE, on a 4-example eval set here): its wall and first-step times are given as measured and
without that evaluation (``eval.json``'s ``eval_seconds``); TRL runs without evaluation.

How each side's figures are taken: TRL's in-process (a TrainerCallback's step-end times, each
step's tokens counted from the batch it trained on); ours from ``RUN/metrics.jsonl`` rows
(``first_step`` and every 10th step) timed as they appear (polled every 20 ms), with each step's
tokens counted from the same batches ``lora train`` builds (the advisor's tokenization and
``flax_lora.data.batch.Batches``, checked against the run's ``resolved.json``).

The TRL side (``benchmarks/e2e_trl.py``) runs in its own virtual environment: ``--trl-python``
(default ``$LORA_TRL_PYTHON``); without one it is skipped and says so. Set one up with
``python3 -m venv /work/venv-trl && /work/venv-trl/bin/pip install torch==2.13.0 trl peft``.
Prints a table and writes ``--json OUT`` (with CPU model and flags, load average and versions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3: pad, bos, eos, unk
MARKUP = (".", ":", "###", "Instruction", "Response")
N_WORDS = 480  # specials + markup + words fit the tiny shape's 512-entry vocabulary
PROMPT = dict(median=80.0, sigma=0.9, low=20, high=400)  # tokens, log-normal, clipped
COMPLETION = dict(median=40.0, sigma=0.8, low=10, high=200)
EVAL_ROWS = 4
LOG_EVERY = 10  # lora train's log interval (RunConfig.log_every); TRL logs at the same steps
POLL_S = 0.02
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
ENV_SHOWN = ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LORA_CPU_PRECISION")
SKIP_TRL = "no TRL python: pass --trl-python PATH or set LORA_TRL_PYTHON (a venv with torch, trl and peft)"


# --- the job's files: checkpoint, tokenizer, data ----------------------------------------------

def pseudo_words(n: int, seed: int = 1234) -> list[str]:
    """``n`` distinct lowercase pseudo-words of 2-3 syllables (a fixed vocabulary, no downloads)."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    rng, out = np.random.default_rng(seed), {}
    while len(out) < n:
        out.setdefault("".join(rng.choice(syllables, int(rng.integers(2, 4)))), None)
    return list(out)


def write_tokenizer(folder: Path, words: list[str]) -> int:
    """A word-level tokenizer (whitespace pre-tokenizer, no BOS added, EOS ``</s>``, pad ``<pad>``)
    saved as ``tokenizer.json`` for ``PreTrainedTokenizerFast``: one token per word or mark, so the
    generated lengths are exact token counts on both sides. Returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate([*SPECIALS, *MARKUP, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 8192}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return len(vocab)


def build_model(folder: Path, shape: str) -> Path:
    """The shape's Llama with PyTorch's random init (seed 0) and the job's tokenizer in ``folder``;
    reused when ``folder`` already holds the same shape."""
    from flax_lora.perf.shapes import PRESETS, llama_config

    marker = folder / "e2e_shape.json"
    want = {"shape": shape, **PRESETS[shape], "words": N_WORDS}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return folder
    import torch
    from transformers import LlamaForCausalLM

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cfg = llama_config(PRESETS[shape], seq=2048)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 0
    n_vocab = write_tokenizer(folder, pseudo_words(N_WORDS))
    assert n_vocab <= cfg.vocab_size, (n_vocab, cfg.vocab_size)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    marker.write_text(json.dumps(want))
    return folder


def lengths(rng, n: int, median: float, sigma: float, low: int, high: int) -> np.ndarray:
    """``n`` log-normal token counts around ``median``, clipped to [low, high] (a long tail up to high)."""
    return np.clip(np.round(rng.lognormal(math.log(median), sigma, n)), low, high).astype(int)


def make_rows(n: int, seed: int, words: list[str], prompt=PROMPT, completion=COMPLETION) -> list[dict]:
    """Prompt/completion rows whose token counts follow the two distributions: a prompt of ``p``
    tokens (``### Instruction:`` + Zipf-drawn words + ``### Response:``) and a completion of ``c``
    tokens (a span of the prompt's words, then ``.``); each example is ``p + c + 1`` tokens with EOS."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    rows = []
    for n_prompt, n_completion in zip(lengths(rng, n, **prompt), lengths(rng, n, **completion)):
        body = list(rng.choice(words, n_prompt - 6, p=zipf))
        start = int(rng.integers(0, len(body)))
        span = [body[(start + i) % len(body)] for i in range(n_completion - 1)]
        rows.append({"prompt": f"### Instruction:\n{' '.join(body)}\n### Response:\n",
                     "completion": " ".join(span) + " ."})
    return rows


def write_data(folder: Path, examples: int, seed: int) -> tuple[Path, Path]:
    """(train JSONL, eval JSONL): ``examples`` rows, and a 4-row eval set with short completions
    (``lora train``'s before/after evaluation generates up to the longest one)."""
    folder.mkdir(parents=True, exist_ok=True)
    words = pseudo_words(N_WORDS)
    train, ev = folder / f"train-{examples}-{seed}.jsonl", folder / f"eval-{seed}.jsonl"
    short = dict(PROMPT, high=60), dict(COMPLETION, low=10, high=16)
    for path, rows in ((train, make_rows(examples, seed, words)), (ev, make_rows(EVAL_ROWS, seed + 1, words, *short))):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train, ev


def data_stats(path: Path, model: Path, max_length: int) -> dict:
    """Token counts of the data's examples (prompt, completion + EOS) with the job's tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    p = np.array([len(tok.encode(r["prompt"]).ids) for r in rows])
    c = np.array([len(tok.encode(r["completion"]).ids) + 1 for r in rows])
    total = p + c
    return {"examples": len(rows), "prompt_tokens_mean": round(float(p.mean()), 1),
            "completion_tokens_mean": round(float(c.mean()), 1), "tokens_p50": int(np.median(total)),
            "tokens_p95": int(np.percentile(total, 95)), "tokens_max": int(total.max()),
            "longer_than_max_length": int((total > max_length).sum())}


# --- running a side and watching it ------------------------------------------------------------

class RowWatch:
    """``RUN/metrics.jsonl`` read while ``lora train`` writes it: each row with the time (seconds
    since the spawn) at which it was first seen."""

    def __init__(self, path: Path):
        self.path, self.offset, self.rows = path, 0, []

    def poll(self, now: float) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        whole = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(whole)
        self.rows += [(now, json.loads(line)) for line in whole.decode().splitlines() if line.strip()]

    def step_times(self) -> dict[int, float]:
        """Step -> when it was seen done: the ``first_step`` row (step 1) and the train-loss rows."""
        return {row["step"]: t for t, row in self.rows if row.get("event") == "first_step" or
                ("loss" in row and "event" not in row)}


@dataclass
class Measured:
    rc: int
    wall_s: float
    peak_rss_mb: float
    loadavg_start: tuple = ()
    log: str = ""
    watch: RowWatch | None = field(default=None, repr=False)


def run_measured(cmd: list[str], env: dict, log_path: Path, watch: RowWatch | None = None) -> Measured:
    """Run ``cmd`` to its exit: wall time, and the peak RSS of its process tree (``wait4``'s
    ``ru_maxrss`` covers the process and its waited-for descendants). The child gets
    ``E2E_SPAWN_TIME`` (this ``time.time()`` at the spawn) to time itself from the same origin."""
    load = os.getloadavg()
    with open(log_path, "wb") as log:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, "E2E_SPAWN_TIME": repr(t0)})
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            now = time.time() - t0
            if watch is not None:
                watch.poll(now)
            if pid:
                break
            time.sleep(POLL_S)
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = log_path.read_text(errors="replace")[-3000:]
    return Measured(proc.returncode, round(now, 2), round(usage.ru_maxrss / 1024, 1), tuple(round(x, 2) for x in load),
                    tail, watch)


def steady_from(steps: int) -> int:
    """The steps left out of the steady rate: the first (compile, warm-up), the first 10 when there are 20+."""
    return LOG_EVERY if steps >= 2 * LOG_EVERY else 1


def rates(tokens: list[int], targets: list[int], times: dict[int, float], k: int, n: int) -> dict:
    """Tokens/s and target tokens/s over steps k+1..n (1-based), from the step-end times of k and n."""
    dt = times[n] - times[k]
    return {"steady_steps": [k + 1, n], "steady_seconds": round(dt, 2),
            "steady_tokens_per_s": round(sum(tokens[k:n]) / dt, 1),
            "steady_target_tokens_per_s": round(sum(targets[k:n]) / dt, 1)}


def window_loss(losses: list[float], targets: list[int], lo: int, hi: int) -> float:
    """Target-token weighted mean loss of steps lo+1..hi (how ``lora train`` logs a window)."""
    w = np.array(targets[lo:hi], float)
    return round(float(np.dot(losses[lo:hi], w) / max(w.sum(), 1.0)), 4)


# --- our side ------------------------------------------------------------------------------------

def write_advice(path: Path, model: Path, data: Path, args, precision: str, packing: bool):
    """The advice file for ``lora train --from-advice``: the advisor asked for exactly the job
    (r, alpha, dropout, targets, schedule, batch, length, precision, packing); returns the advice."""
    from advisor import advise

    advice = advise(vram_gb=16.0, model=str(model), data=str(data), r=args.r, alpha=args.alpha, dropout=0.0,
                    target_modules=TARGETS, learning_rate=args.learning_rate, lr_schedule="constant",
                    warmup_steps=0, batch_size=args.batch_size, gradient_accumulation_steps=1,
                    max_length=args.max_length, precision=precision, packing=packing,
                    gradient_checkpointing=False, quantization="none", epochs=1)
    path.write_text(advice.to_json())
    return advice


def lora_command(run: Path, advice: Path, model: Path, data: Path, ev: Path, args, precision, packing) -> list[str]:
    exe = Path(sys.executable).with_name("lora")
    head = [str(exe)] if exe.is_file() else [sys.executable, "-m", "cli"]
    return [*head, "train", "--from-advice", str(advice), "--model", str(model), "--data", str(data),
            "--eval-data", str(ev), "--output", str(run), "--max-steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
            "--learning-rate", str(args.learning_rate), "--precision", precision,
            "--packing" if packing else "--no-packing", "--seed", str(args.seed), "--quiet"]


def our_batches(model: Path, data: Path, args, packing: bool) -> dict:
    """Each step's tokens as ``lora train`` batches them (the advisor's tokenization, cut to max
    length, ``Batches`` with the run's seed): non-padding, padded and target tokens (the loss's
    ``loss_mask[..., 1:]``), and each batch's shape."""
    from advisor.examples import encode_rows, fit
    from advisor.tokenizer import Tokenizer
    from flax_lora.data.batch import Batches
    from flax_lora.data.load import load_checked

    rows, fmt, report = load_checked(str(data))
    tok = Tokenizer.from_folder(model)
    examples = [fit(ex, args.max_length, fmt.kind)[0] for ex in encode_rows(rows, fmt, tok, None, report)]
    batches = Batches(examples, args.batch_size, 1, args.seed, args.max_length, tok.pad_id, packing=packing)
    out = {"tokens": [], "padded": [], "targets": [], "shapes": [], "examples": len(examples),
           "rows": len(batches.rows) if packing else len(examples), "steps_per_epoch": batches.steps_per_epoch}
    stream = batches.iterate()
    for _ in range(args.steps):
        _, b = next(stream)
        out["tokens"].append(int(b["attention_mask"].sum()))
        out["padded"].append(int(b["input_ids"].size))
        out["targets"].append(int(b["loss_mask"][..., 1:].sum()))
        out["shapes"].append(list(b["input_ids"].shape[1:]))
    return out


def check_our_run(run: Path, counted: dict, args, precision: str, packing: bool) -> dict:
    """The run's own config and resolution, checked against the job (a benchmark of another job,
    or of batches counted differently, fails here instead of reporting wrong figures)."""
    cfg = json.loads((run / "run_config.json").read_text())
    res = json.loads((run / "resolved.json").read_text())
    want = dict(r=args.r, alpha=args.alpha, dropout=0.0, lr_schedule="constant", warmup_steps=0, batch_size=args.batch_size,
                grad_accum=1, max_length=args.max_length, learning_rate=args.learning_rate, precision=precision,
                packing=packing, remat=False, quantization="none", max_steps=args.steps, seed=args.seed)
    wrong = {k: (cfg.get(k), v) for k, v in want.items() if cfg.get(k) != v}
    targets = sorted({t.rsplit("/", 1)[-1].split(".")[-1] for t in res["targets"]})
    if targets != sorted(TARGETS):
        wrong["targets"] = (targets, sorted(TARGETS))
    for key in ("train_examples", "steps_per_epoch"):
        mine = counted["examples" if key == "train_examples" else key]
        if res[key] != mine:
            wrong[key] = (res[key], mine)
    if wrong:
        raise SystemExit(f"e2e: {run} is not the benchmark's job (run value, wanted): {wrong}")
    return {"weight_decay": cfg["weight_decay"], "max_grad_norm": cfg["max_grad_norm"], "devices": res["devices"]}


def summarize_ours(run: Path, m: Measured, counted: dict, args) -> dict:
    """Our side's figures from the process measurement, ``metrics.jsonl`` row times and ``eval.json``."""
    n, k = args.steps, steady_from(args.steps)
    ev = json.loads((run / "eval.json").read_text())
    times = m.watch.step_times()
    first = next(row for _, row in m.watch.rows if row.get("event") == "first_step")
    losses = {row["step"]: row["loss"] for _, row in m.watch.rows if "loss" in row and "event" not in row}
    ttfs = times[1]
    new_shapes = sorted({tuple(s) for s in counted["shapes"][k:]} - {tuple(s) for s in counted["shapes"][:k]})
    return {
        "wall_s": m.wall_s, "eval_s": ev["eval_seconds"], "wall_without_eval_s": round(m.wall_s - ev["eval_seconds"], 2),
        "time_to_first_step_s": round(ttfs, 2),
        "time_to_first_step_without_eval_s": round(ttfs - first["eval_before_seconds"], 2),
        **rates(counted["tokens"], counted["targets"], times, k, n),
        "tokens_total": sum(counted["tokens"]), "target_tokens_total": sum(counted["targets"]),
        "padded_tokens_total": sum(counted["padded"]), "train_rows": counted["rows"], "peak_rss_mb": m.peak_rss_mb,
        "first_loss": losses[min(LOG_EVERY, n)], "final_loss": losses[n],
        "final_loss_steps": [LOG_EVERY * ((n - 1) // LOG_EVERY) + 1, n],
        "new_batch_shapes_in_steady_steps": [list(s) for s in new_shapes],  # each one a compile while timed
        "step_end_s": {step: round(t, 2) for step, t in sorted(times.items())},  # at lora train's log points
        "reported": {"time_to_first_step_seconds": first["time_to_first_step_seconds"],
                     "load_seconds": first["load_seconds"], "eval_before_seconds": first["eval_before_seconds"],
                     "compile_and_first_step_seconds": first["compile_and_first_step_seconds"],
                     "train_tokens_per_second": ev.get("train_tokens_per_second"), "wall_seconds": ev["wall_seconds"]},
        "loadavg_start": m.loadavg_start,
    }


def run_ours(work: Path, model: Path, data: Path, ev: Path, args, precision: str, packing: bool, env: dict) -> dict:
    """``lora train`` on the job, measured: its figures, or the error it ended with."""
    name = f"lora-{precision}-{'packed' if packing else 'unpacked'}"
    run, advice = work / "runs" / name, work / "runs" / f"{name}.advice.json"
    shutil.rmtree(run, ignore_errors=True)
    run.parent.mkdir(parents=True, exist_ok=True)
    write_advice(advice, model, data, args, precision, packing)
    cmd = lora_command(run, advice, model, data, ev, args, precision, packing)
    counted = our_batches(model, data, args, packing)
    m = run_measured(cmd, {**env, "JAX_PLATFORMS": "cpu"}, work / "runs" / f"{name}.log", RowWatch(run / "metrics.jsonl"))
    if m.rc != 0:
        return {"error": f"exit {m.rc}", "log": str(work / "runs" / f"{name}.log"), "log_tail": m.log, "command": cmd}
    job = check_our_run(run, counted, args, precision, packing)
    return {**summarize_ours(run, m, counted, args), "job": job, "command": cmd}


# --- the TRL side --------------------------------------------------------------------------------

def trl_python(args) -> str | None:
    return args.trl_python or os.environ.get("LORA_TRL_PYTHON") or None


def trl_versions(python: str) -> dict:
    code = ("import json, importlib.metadata as m; print(json.dumps({n: m.version(n) for n in "
            "('torch', 'transformers', 'trl', 'peft', 'datasets', 'accelerate')}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-500:]}


def trl_env(run: Path) -> dict:
    """The TRL process's environment: offline, a fresh datasets cache (it tokenizes cold, as
    ``lora train`` does), nothing of this project's on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(run / "datasets-cache"),
            "TRANSFORMERS_VERBOSITY": "warning"}


def summarize_trl(t: dict, m: Measured, args) -> dict:
    """TRL's figures from its per-step timings and the process measurement."""
    n, k = args.steps, steady_from(args.steps)
    steps = t["steps"]
    tokens, targets = [s["tokens"] for s in steps], [s["targets"] for s in steps]
    losses = [s["loss"] for s in steps]
    times = {s["step"]: s["t"] for s in steps}
    lo = LOG_EVERY * ((n - 1) // LOG_EVERY)
    return {
        "wall_s": m.wall_s, "eval_s": 0.0, "wall_without_eval_s": m.wall_s,
        "time_to_first_step_s": round(times[1], 2), "time_to_first_step_without_eval_s": round(times[1], 2),
        **rates(tokens, targets, times, k, n),
        "tokens_total": sum(tokens), "target_tokens_total": sum(targets),
        "padded_tokens_total": sum(s["padded_tokens"] for s in steps), "train_rows": t["train_rows"],
        "peak_rss_mb": m.peak_rss_mb,
        "first_loss": window_loss(losses, targets, 0, min(LOG_EVERY, n)), "final_loss": window_loss(losses, targets, lo, n),
        "final_loss_steps": [lo + 1, n],
        "reported": {k2: t[k2] for k2 in ("train_runtime_s", "train_loss_trl", "num_tokens_trl",
                                           "padding_free", "optim", "activation_checkpointing",
                                           "attn_implementation", "model_dtype", "torch_threads")},
        "step_end_s": [round(times[i], 2) for i in sorted(times)],
        "loadavg_start": m.loadavg_start,
    }


def run_trl(python: str, work: Path, model: Path, data: Path, args, precision: str, packing: bool, job: dict) -> dict:
    """``benchmarks/e2e_trl.py`` on the job in the TRL environment, measured."""
    name = f"trl-{precision}-{'packed' if packing else 'unpacked'}"
    run = work / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    timings = run / "timings.json"
    cmd = [python, str(Path(__file__).with_name("e2e_trl.py")), "--model", str(model), "--data", str(data),
           "--output", str(run / "adapter"), "--timings", str(timings), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--learning-rate", str(args.learning_rate), "--precision", precision, "--r", str(args.r),
           "--alpha", str(args.alpha), "--targets", ",".join(TARGETS), "--seed", str(args.seed),
           "--weight-decay", str(job.get("weight_decay", 0.0)), "--max-grad-norm", str(job.get("max_grad_norm", 1.0)),
           "--log-every", str(LOG_EVERY), *(["--packing"] if packing else [])]
    m = run_measured(cmd, trl_env(run), work / "runs" / f"{name}.log")
    if m.rc != 0 or not timings.is_file():
        return {"error": f"exit {m.rc}", "log": str(work / "runs" / f"{name}.log"), "log_tail": m.log, "command": cmd}
    return {**summarize_trl(json.loads(timings.read_text()), m, args), "command": cmd}


# --- report --------------------------------------------------------------------------------------

def machine() -> dict:
    """CPU model, the flags that decide the fast paths, core count, load average."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    return {"cpu": model, "flags": {f: f in flags for f in CPU_FLAGS}, "cores": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "env": {k: os.environ[k] for k in ENV_SHOWN if k in os.environ}}


def our_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "transformers", "torch", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


COLUMNS = (  # (report key, heading, cell format)
    ("side", "side", "{:<5}"), ("precision", "prec", "{:<4}"), ("packing", "packing", "{:<8}"),
    ("wall_s", "wall s", "{:>7.1f}"), ("wall_without_eval_s", "wall-eval", "{:>9.1f}"),
    ("time_to_first_step_s", "1st step s", "{:>10.1f}"), ("time_to_first_step_without_eval_s", "1st-eval", "{:>8.1f}"),
    ("steady_tokens_per_s", "tok/s", "{:>7.1f}"), ("steady_target_tokens_per_s", "tgt tok/s", "{:>9.1f}"),
    ("peak_rss_mb", "RSS MB", "{:>7.0f}"), ("final_loss", "loss", "{:>7.4f}"))


def table_row(cells: list) -> str:
    return "  ".join(fmt.format(v) for (_, _, fmt), v in zip(COLUMNS, cells))


def table(report: dict) -> str:
    """The report as text: machine and versions, the job, one line per side and configuration."""
    m, j = report["machine"], report["job"]
    flags = " ".join(f for f, on in m["flags"].items() if on) or "none of " + ",".join(CPU_FLAGS)
    widths = [len(fmt.format("x" if "<" in fmt else 0.0)) for _, _, fmt in COLUMNS]
    lines = [f"CPU: {m['cpu']} ({m['cores']} cores), flags: {flags}; load average {m['loadavg']} at start, "
             f"{m.get('loadavg_end')} at the end",
             f"lora: {json.dumps(report['versions']['lora'])}", f"trl:  {json.dumps(report['versions']['trl'])}",
             f"job: {j['shape']}, {j['steps']} steps x batch {j['batch_size']}, max length {j['max_length']}, "
             f"lr {j['learning_rate']}, LoRA r{j['r']}/alpha {j['alpha']:g} on {','.join(j['targets'])}; "
             f"{j['examples']} examples (p50 {j['tokens_p50']}, p95 {j['tokens_p95']} tokens); "
             f"steady = steps {j['steady_from_step']}..{j['steps']}",
             "  ".join(f"{head:<{w}}" if "<" in fmt else f"{head:>{w}}" for (_, head, fmt), w in zip(COLUMNS, widths))]
    for run in report["runs"]:
        for side in ("lora", "trl"):
            r, head = run[side], [side, run["precision"], "packed" if run["packing"] else "unpacked"]
            if "skipped" in r or "error" in r:
                lines.append(table_row(head) + "  " + (f"skipped: {r['skipped']}" if "skipped" in r
                                                       else f"ERROR {r['error']} (log: {r.get('log')})"))
            else:
                lines.append(table_row(head + [r[key] for key, _, _ in COLUMNS[3:]]))
    return "\n".join(lines + [f"note: {n}" for n in report["notes"]])


NOTES = (
    "tok/s counts non-padding tokens, tgt tok/s the tokens the loss averages over; both over the steady steps",
    "lora train pads each batch to a power-of-two length bucket (a new bucket compiles once); TRL pads to the "
    "batch's longest row",
    "examples longer than max length: lora train cuts the prompt from the left (the completion keeps at least half), "
    "TRL cuts the end (keep_start): same tokens, different targets",
    "wall-eval, 1st-eval: lora train's before/after evaluation (loss + ROUGE on 4 examples) subtracted; TRL runs no evaluation",
    "TRL drops (unpacked) the examples whose prompt alone fills max length (no target left); lora train keeps "
    "them: train_rows in the JSON",
    "TRL packing (bfd) is padding-free: a batch is one flattened row of batch x max length tokens, attention kept "
    "within each example by a block-diagonal mask from the position ids (SDPA, no flash attention on CPU); "
    "lora train packs rows of max length with segment ids",
)


def busy_notes(report: dict) -> list[str]:
    """A warning when other work ran beside the benchmark (1-minute load average at a run's start
    above cores - 1): both trainers' threads then wait on each other's cores, PyTorch's OpenMP
    threads most (a step that waits on a descheduled thread waits for all of them)."""
    cores = report["machine"]["cores"] or 1
    loads = [r[side]["loadavg_start"][0] for r in report["runs"] for side in ("lora", "trl")
             if "loadavg_start" in r[side]]
    if not loads or max(loads) <= cores - 1:
        return []
    return [f"the machine was busy: 1-minute load {min(loads)}-{max(loads)} at the runs' starts on {cores} cores; "
            "these figures are not for the record"]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m", choices=["smollm2-135m", "tiny"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--examples", type=int, default=1000, help="training rows generated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "both"],
                   help="auto: fp32, and bf16 too where the CPU has AVX512-BF16/AMX-BF16")
    p.add_argument("--packing", default="both", choices=["both", "off", "on"])
    p.add_argument("--sides", default="lora,trl", help="comma-separated: lora, trl")
    p.add_argument("--trl-python", help="python of a venv with torch, trl, peft (default: $LORA_TRL_PYTHON)")
    p.add_argument("--workdir", default="/tmp/lora-e2e", help="model, data and run folders (the model is reused)")
    p.add_argument("--json", dest="json_out", help="write the report here")
    return p.parse_args(argv)


def precisions(choice: str, flags: dict) -> list[str]:
    if choice in ("fp32", "bf16"):
        return [choice]
    bf16_cpu = flags.get("avx512_bf16") or flags.get("amx_bf16")
    return ["fp32", "bf16"] if choice == "both" or bf16_cpu else ["fp32"]


def run_all(args, work: Path, model: Path, data: Path, ev: Path, trl_py: str | None) -> list[dict]:
    """Every (precision, packing) pair: ours then TRL's, interleaved so the machine's load hits both."""
    sides = set(args.sides.split(","))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    runs = []
    for prec in precisions(args.precision, machine()["flags"]):
        for packing in {"both": (False, True), "off": (False,), "on": (True,)}[args.packing]:
            row = {"precision": prec, "packing": packing}
            row["lora"] = (run_ours(work, model, data, ev, args, prec, packing, env) if "lora" in sides
                           else {"skipped": "--sides leaves it out"})
            job = row["lora"].get("job") or {}
            if "trl" not in sides:
                row["trl"] = {"skipped": "--sides leaves it out"}
            elif trl_py is None:
                row["trl"] = {"skipped": SKIP_TRL}
            else:
                row["trl"] = run_trl(trl_py, work, model, data, args, prec, packing, job)
            runs.append(row)
            print(f"e2e: {prec} {'packed' if packing else 'unpacked'} done", file=sys.stderr, flush=True)
    return runs


def main(argv=None) -> int:
    args = parse(argv)
    work = Path(args.workdir).resolve()
    trl_py = trl_python(args)
    if trl_py is not None and not shutil.which(trl_py):
        raise SystemExit(f"e2e: --trl-python {trl_py}: not an executable")
    model = build_model(work / f"model-{args.shape}", args.shape)
    data, ev = write_data(work / "data", args.examples, args.seed)
    report = {"machine": machine(),
              "versions": {"lora": our_versions(), "trl": trl_versions(trl_py) if trl_py else {"skipped": SKIP_TRL}},
              "job": {"shape": args.shape, "steps": args.steps, "batch_size": args.batch_size,
                      "max_length": args.max_length, "learning_rate": args.learning_rate, "r": args.r,
                      "alpha": args.alpha, "dropout": 0.0, "targets": list(TARGETS), "seed": args.seed,
                      "model": str(model), "data": str(data), "eval_data": str(ev), "log_every": LOG_EVERY,
                      "steady_from_step": steady_from(args.steps) + 1, **data_stats(data, model, args.max_length)},
              "notes": list(NOTES)}
    report["runs"] = run_all(args, work, model, data, ev, trl_py)
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["notes"] += busy_notes(report)
    print(table(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    failed = [r for run in report["runs"] for r in (run["lora"], run["trl"]) if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
