"""`lora data`: how a data file's rows become training tokens, before any GPU time is spent.

Pure advisor code (no jax): the rows are read, checked, rendered and tokenized by the same path
`lora train` uses (advisor.examples), so the trained spans shown are the trained spans.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.advise import _OneLineErrors

MARK = ("«", "»")  # around trained text in the text output
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "config.json"]


def _model_folder(model: str | None) -> Path | None:
    """A folder holding the model's tokenizer files: local, in the HF cache, or fetched (tokenizer only)."""
    if model is None:
        return None
    from advisor import catalog
    from advisor.errors import UserError

    folder = catalog.model_dir(model)
    if folder is not None:
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=TOKENIZER_FILES))
    except Exception as exc:  # offline, unknown, gated
        raise UserError(f"--model {model}: not a local folder, not in the Hugging Face cache, and not reachable "
                        f"({type(exc).__name__}); pass a local folder with tokenizer.json") from None


def _marked(pieces) -> str:
    return "".join(f"{MARK[0]}{text}{MARK[1]}" if trained else text for text, trained in pieces)


def _summary(m, path: str, max_length: int | None) -> dict:
    from advisor.data_stats import percentile

    rep, lengths = m.report, m.lengths
    out = {"data": path, "format": m.fmt.describe(), "chat_template": m.template,
           "length_unit": "tokens" if m.tokenizer else "estimated-tokens",
           "tokenizer": str(m.tokenizer) if m.tokenizer else None,
           "rows": rep.total, "kept": len(lengths),
           "dropped": [{rep.unit: b.line, "reason": b.reason} for b in rep.bad],
           "lengths": {"p50": percentile(lengths, 50), "p95": percentile(lengths, 95), "max": max(lengths)}}
    if max_length:
        out["max_length"] = max_length
        out["longer_than_max_length"] = sum(n > max_length for n in lengths)
    return out


def _render_text(summary: dict, shown: list[dict]) -> str:
    exact = summary["tokenizer"] is not None
    unit = "tokens" if exact else "tokens estimated at 4 chars/token; give --model for exact counts"
    lines = [f"lora data {summary['data']}: format {summary['format']}"
             + (f", chat template: {summary['chat_template']}" if summary["chat_template"] else ""),
             f"rows: {summary['rows']} read, {summary['kept']} kept, {len(summary['dropped'])} dropped"]
    lines += [f"  dropped line {d.get('line', d.get('row'))}: {d['reason']}" for d in summary["dropped"][:10]]
    lp = summary["lengths"]
    lines.append(f"length: p50 {lp['p50']}, p95 {lp['p95']}, max {lp['max']} ({unit})")
    if "max_length" in summary:
        lines.append(f"longer than max_length {summary['max_length']}: {summary['longer_than_max_length']}")
    chat = summary["format"].startswith(("chat", "sharegpt"))
    for ex in shown:
        what = (f"{ex['tokens']} tokens, {ex['trained_tokens']} trained" if exact else
                f"~{ex['tokens']} tokens; trained text" + ("" if chat else " (and the EOS after it)"))
        lines += ["", f"example (line {ex['line']}): {what} {MARK[0]}like this{MARK[1]}", _marked(ex["pieces"])]
    return "\n".join(lines)


@click.command(cls=_OneLineErrors)
@click.option("--data", required=True, help="JSONL/JSON/CSV/Parquet file.")
@click.option("--model", help="Hub id or local folder: its tokenizer and chat template (else lengths are estimated).")
@click.option("--format", "data_format", type=click.Choice(["prompt-completion", "alpaca", "chat", "sharegpt", "text"]),
              help="How to read the rows (default: detected from the columns).")
@click.option("--input-field", help="Column holding the prompt.")
@click.option("--target-field", help="Column holding the target (a chat's turns, a document).")
@click.option("--chat-template", help="Chat data: a Jinja template file, or 'chatml' (default: the tokenizer's).")
@click.option("--max-length", type=click.IntRange(min=8), help="Also count the rows longer than this.")
@click.option("--on-bad-row", type=click.Choice(["skip", "fail"]), default="skip", show_default=True)
@click.option("--show", type=click.IntRange(min=0), default=3, show_default=True, help="Examples to print, trained text marked.")
@click.option("--json", "as_json", is_flag=True, help="Print the report and the examples' {text, trained} segments as JSON.")
def data(data, model, data_format, input_field, target_field, chat_template, max_length, on_bad_row, show, as_json):
    """Show how DATA's rows become training tokens: format, kept and dropped rows, lengths, trained spans."""
    from advisor.data_stats import measure

    m = measure(data, _model_folder(model), data_format=data_format, input_field=input_field,
                target_field=target_field, chat_template=chat_template, policy=on_bad_row, pieces=show)
    summary = _summary(m, data, max_length)
    if as_json:
        summary["examples"] = [{"line": ex["line"], "tokens": ex["tokens"], "trained_tokens": ex["trained_tokens"],
                                "segments": [{"text": t, "trained": on} for t, on in ex["pieces"]]} for ex in m.shown]
        click.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    click.echo(_render_text(summary, m.shown))
