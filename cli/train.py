"""`lora train`, `lora eval`, `lora generate`: thin CLI over flax_lora.training (jax imported lazily)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.advise import _OneLineErrors


def _load_advice(path: str):
    from advisor.schema import Advice
    from flax_lora.errors import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"advice file not found: {path}")
    try:
        return Advice.from_json(p.read_text())
    except ValueError as exc:  # pydantic ValidationError is a ValueError
        first = str(exc).splitlines()
        raise UserError(f"{path}: not a valid advice file ({' '.join(first[:3])})") from None


def _report_to(value: str | None):
    """``tensorboard,wandb`` -> ("tensorboard", "wandb"); ``none`` -> ()."""
    if value is None:
        return None
    names = tuple(dict.fromkeys(n.strip().lower() for n in value.split(",") if n.strip()))
    if names in ((), ("none",)):
        return ()
    from flax_lora.errors import UserError
    from flax_lora.training.report import REPORTERS

    bad = [n for n in names if n not in REPORTERS]
    if bad:
        raise UserError(f"--report-to {value!r}: use none or a comma-separated list of {', '.join(REPORTERS)}")
    return names


@click.command("train")
@click.option("--from-advice", "advice_file", type=str, help="Advice JSON from `lora advise -o`.")
@click.option("--model", type=str, help="Hub id or local folder (default: the built-in demo).")
@click.option("--data", type=str, help="JSONL/JSON/CSV/Parquet file or Hub dataset (default: the demo's).")
@click.option("--eval-data", type=str, help="Eval set (default: a held-out 5% of --data).")
@click.option("--split", type=str, help="Hub dataset: the split to train on (default: train). --data NAME:SUBSET picks a subset.")
@click.option("--eval-split", type=str,
              help="Hub dataset: the eval split (default: its validation split when it has one, else a held-out 5%).")
@click.option("--packing/--no-packing", default=None,
              help="Pack several examples per row (attention stays within each); default: the advice's.")
@click.option("--output", "-o", type=str, default="run", show_default=True, help="Run directory.")
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop after N optimizer steps.")
@click.option("--epochs", type=click.IntRange(min=1))
@click.option("--batch-size", type=click.IntRange(min=1), help="Per-device micro-batch size.")
@click.option("--grad-accum", type=click.IntRange(min=1), help="Gradient accumulation steps.")
@click.option("--max-length", type=click.IntRange(min=8))
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True, max=1))
@click.option("--save-every", type=click.IntRange(min=0), help="Checkpoint every N steps (0: only at the end).")
@click.option("--eval-every", type=click.IntRange(min=0), help="Validation loss every N steps.")
@click.option("--log-every", type=click.IntRange(min=1), help="A metrics.jsonl row (loss, tokens/s) every N steps (default 10).")
@click.option("--rouge-examples", type=click.IntRange(min=0),
              help="Eval examples answered for ROUGE before and after training (default 32; 0: loss only, no generation).")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its last checkpoint.")
@click.option("--seed", type=int)
@click.option("--precision", type=click.Choice(["bf16", "fp32"]))
@click.option("--quantization", type=click.Choice(["none", "int8", "nf4", "nf4-dq"]),
              help="Frozen linear weights: int8 (the guide's load_in_8bit), nf4 (QLoRA's NormalFloat-4, blocks "
                   "of 64), nf4-dq (nf4 with 8-bit scales); default: the advice's.")
@click.option("--format", "data_format", type=click.Choice(["prompt-completion", "alpaca", "chat", "sharegpt", "text"]),
              help="How to read the rows (default: detected from the columns).")
@click.option("--input-field", type=str, help="Column holding the prompt.")
@click.option("--target-field", type=str, help="Column holding the target (a chat's turns, a document).")
@click.option("--chat-template", type=str,
              help="Chat data: a Jinja template file, or 'chatml' (default: the tokenizer's own, else chatml).")
@click.option("--adapter", type=str, help="Continue training this adapter (a lora adapter or PEFT directory).")
@click.option("--on-bad-row", type=click.Choice(["skip", "fail"]),
              help="skip (default): drop bad rows and report them, fail if more than 10% are bad; fail: any bad row fails.")
@click.option("--on-divergence", type=click.Choice(["stop", "halve-lr"]),
              help="On a NaN/inf loss or gradient: stop (default) keeping the last good checkpoint, or roll back "
                   "to it and halve the learning rate (at most 3 times).")
@click.option("--shard-frozen/--no-shard-frozen", default=None,
              help="Split the frozen weights over the devices (FSDP style; each device loads only its slice) "
                   "instead of a full copy on each (default: the advice's, and automatic when a full copy would "
                   "take over half of a device's memory).")
@click.option("--remat", is_flag=True, default=None,
              help="Gradient checkpointing: recompute each layer's activations in the backward pass (less memory, "
                   "about a third more compute); llama, mistral, qwen2.")
@click.option("--coordinator", type=str, help="Several hosts: process 0's host:port (or LORA_COORDINATOR).")
@click.option("--num-processes", type=click.IntRange(min=1), help="Several hosts: process count (or LORA_NUM_PROCESSES).")
@click.option("--process-id", type=click.IntRange(min=0), help="Several hosts: this process's id (or LORA_PROCESS_ID).")
@click.option("--report-to", "report_to", type=str,
              help="Also write metrics to: none (default), tensorboard (event files in RUN/events), wandb, or both "
                   "(comma-separated).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or messages (scripts).")
def train(advice_file, model, data, eval_data, split, eval_split, packing, output, max_steps, epochs, batch_size, grad_accum, max_length,
          learning_rate, save_every, eval_every, log_every, rouge_examples, resume, seed, precision, quantization, data_format, input_field,
          target_field, chat_template,
          adapter, on_bad_row, on_divergence, shard_frozen, remat, coordinator, num_processes, process_id, report_to,
          quiet):
    """Train a LoRA adapter: flags override the advice; no --model/--data trains the built-in demo.

    Ctrl-C / SIGTERM save a checkpoint and exit 130 / 143; `lora train --output DIR --resume`
    continues (a resume may change the step budget, intervals and --learning-rate). A diverged
    run (NaN/inf) stops with exit 2, keeping the last good checkpoint. Every visible device
    trains data parallel (effective batch = batch size x accumulation x devices). Several hosts:
    start one `lora train` per host with --coordinator/--num-processes/--process-id (or the LORA_*
    variables, or under SLURM with none); --output must be a folder all hosts share, and
    process 0 alone writes it.
    """
    from flax_lora.training.parallel import init_distributed

    init_distributed(coordinator, num_processes, process_id)  # before any other JAX use; no-op on one host
    from flax_lora.errors import Interrupted
    from flax_lora.training.loop import train as run_train
    from flax_lora.training.parallel import agreed

    overrides = dict(eval_data=eval_data, split=split, eval_split=eval_split, packing=packing, max_steps=max_steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
                     max_length=max_length, learning_rate=learning_rate, save_every=save_every, eval_every=eval_every,
                     log_every=log_every, rouge_examples=rouge_examples,
                     seed=seed, precision=precision, quantization=quantization, data_format=data_format,
                     input_field=input_field, target_field=target_field, chat_template=chat_template,
                     adapter=adapter, on_bad_row=on_bad_row, on_divergence=on_divergence, shard_frozen=shard_frozen,
                     remat=remat, report_to=_report_to(report_to))
    # every process plans the same run; a user error on any one stops all of them (none waits at a collective)
    cfg, advice_json, note = agreed(_plan, advice_file, model, data, output, overrides, resume)
    try:
        result = run_train(cfg, resume=resume, advice_json=advice_json, quiet=quiet, note=note)
    except Interrupted as exc:
        click.echo(str(exc), err=True)
        raise click.exceptions.Exit(exc.exit_code) from None
    import jax

    if quiet and jax.process_index() == 0:
        click.echo(json.dumps({"output": cfg.output, "eval_loss": result["after"]["loss"],
                               "rougeL": result["after"].get("rougeL")}))


def _plan(advice_file, model, data, output, overrides, resume):
    """(run config, advice JSON to record or None, note): a resume needs only the run folder; a new
    run takes the advice file, or asks the advisor for this model and data."""
    from flax_lora.training.config import advice_for, config_for_resume, config_from_advice, precision_note
    from flax_lora.training.rundir import RunDir

    if resume and model is None and data is None and not advice_file and RunDir(output).exists():
        return config_for_resume(RunDir(output).load_config(), output, overrides), None, None
    reading = {k: overrides.get(k) for k in ("data_format", "input_field", "target_field", "chat_template")}
    advice, note = ((_load_advice(advice_file), None) if advice_file
                    else advice_for(model, data, overrides.get("split"), **reading))
    cfg = config_from_advice(advice, model=model, data=data, output=output, overrides=overrides)
    notes = [n for n in (note, precision_note(cfg, overrides)) if n]
    return cfg, advice.to_json(), "; ".join(notes) or None


@click.command("eval")
@click.argument("run_dir", type=str)
@click.option("--data", type=str, help="Evaluate on this file instead of the run's eval set.")
@click.option("--rouge-examples", type=click.IntRange(min=0), default=32, show_default=True)
def eval_cmd(run_dir, data, rouge_examples):
    """Evaluate a run directory's adapter: loss, perplexity, ROUGE-1/2/L (JSON on stdout)."""
    from flax_lora.evaluation.evaluator import Evaluator
    from flax_lora.training.build import load_run

    s, lora = load_run(run_dir, data=data)
    ev = Evaluator(s.model, s.lora_cfg, s.tokenizer, s.eval_examples, max_length=s.cfg.max_length,
                   max_new_tokens=s.cfg.max_new_tokens, stop_ids=s.stop_ids)
    res = ev.evaluate(lora, s.model.params, rouge_examples)
    res.pop("samples", None)
    click.echo(json.dumps(res, indent=2))




def _generation_setup(run_dir, model, adapter):
    """(model, tokenizer, adapter, LoraConfig, trained on chats, the run's --chat-template or None)
    of a run directory, or of ``--model`` with an optional ``--adapter``."""
    from flax_lora.errors import UserError
    from flax_lora.lora import LoraConfig

    if bool(run_dir) == bool(model):
        raise UserError("give a RUN_DIR or --model (with an optional --adapter), not both")
    if run_dir:
        from flax_lora.training.build import load_run

        s, lora = load_run(run_dir)
        return s.model, s.tokenizer, lora, s.lora_cfg, s.data_format.kind == "chat", s.cfg.chat_template
    from flax_lora.adapters.find import find_adapter, load_any_adapter
    from flax_lora.models import load_model, load_tokenizer

    if adapter:
        find_adapter(adapter)  # a wrong path fails before the model loads
    m, tok = load_model(model), load_tokenizer(model)
    lora, lora_cfg = {}, LoraConfig(1, 1.0)
    if adapter:
        lora, lora_cfg = load_any_adapter(adapter, m.linears(), m.model_type)
    return m, tok, lora, lora_cfg, False, None


def _generation_prompt(tok, prompt: str, system: str | None, chat: bool, chat_template: str | None):
    """The prompt as training saw its rows: a user turn in the chat template (chat), else
    ``tokenizer(prompt)``."""
    from flax_lora.errors import UserError
    from flax_lora.evaluation.generate import Prompt

    if not chat:
        if system is not None:
            raise UserError("--system needs a chat prompt (--chat)")
        return Prompt.plain(tok, prompt)
    from advisor.templates import choose

    template, _ = choose(tok.chat_template, chat_template)
    return Prompt.chat(tok, template, prompt, system)


@click.command("generate", cls=_OneLineErrors)
@click.argument("run_dir", required=False, type=str)
@click.option("--model", type=str, help="Base model (Hub id or folder) when no RUN_DIR is given.")
@click.option("--adapter", type=str, help="Adapter to apply to --model: a lora adapter or PEFT directory.")
@click.option("--prompt", required=True, type=str)
@click.option("--system", type=str, help="A system turn before the prompt (chat prompts only).")
@click.option("--chat/--no-chat", default=None,
              help="Send --prompt as a user turn in the chat template (default: when the run trained on chats).")
@click.option("--max-new-tokens", type=click.IntRange(min=1, max=1024), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", type=click.FloatRange(min=0, min_open=True, max=1), default=1.0, show_default=True,
              help="Sample from the smallest set of likeliest tokens holding this probability.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (same seed, same text).")
@click.option("--chat-template", type=str,
              help="Chat prompts: a Jinja template file or 'chatml' (default: the run's, else the tokenizer's).")
def generate(run_dir, model, adapter, prompt, system, chat, max_new_tokens, temperature, top_p, seed, chat_template):
    """Continuation of --prompt from a run directory, or a model (+ optional adapter): greedy, or
    sampled with --temperature/--top-p; a chat run's prompt is a user turn, its answer ends at the
    template's end-of-turn. Prints the generated text only."""
    import numpy as np

    from flax_lora.errors import UserError
    from flax_lora.evaluation.evaluator import Evaluator
    from flax_lora.evaluation.generate import Sampling

    if system is not None and (chat is False or (model and chat is None)):
        raise UserError("--system needs a chat prompt (--chat)")  # before any model loads
    m, tok, lora, lora_cfg, chats, run_template = _generation_setup(run_dir, model, adapter)
    p = _generation_prompt(tok, prompt, system, chats if chat is None else chat, chat_template or run_template)
    if not p.ids:
        raise UserError("--prompt tokenizes to nothing")
    ev = Evaluator(m, lora_cfg, tok, [], max_length=max(len(p.ids), 16), batch_size=1, max_new_tokens=max_new_tokens,
                   stop_ids=p.stop_ids)
    out = ev.generate(lora, m.params, [np.asarray(p.ids, np.int32)], Sampling(temperature, top_p, seed))[0]
    click.echo(p.answer(tok, out))  # the continuation only
