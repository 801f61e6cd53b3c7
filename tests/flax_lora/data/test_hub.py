"""Datasets the way people name them (``NAME[:SUBSET]``, ``--split``, ``--eval-split``), offline.

No machine here reaches the Hub, so the real ``datasets.load_dataset`` path reads local,
script-free dataset folders: ``plain/`` (``data/train-*.parquet``, ``data/validation-*.parquet``:
splits named by the files) and ``multi/`` (subsets ``subset_a`` with train + validation and
``subset_b`` with train only, named by its README's YAML ``configs:``).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from flax_lora import demo
from flax_lora.data.load import DataRef, is_local, load_checked, parse, read_rows, resolve
from flax_lora.errors import UserError
from flax_lora.training.build import Sources, _rows

TRAIN, VALID = demo.make_rows(40, 0), demo.make_rows(8, 1)
SUB_A, SUB_A_VALID, SUB_B = demo.make_rows(30, 2), demo.make_rows(6, 3), demo.make_rows(20, 4)

README = """---
configs:
- config_name: subset_a
  data_files:
  - split: train
    path: subset_a/train-*.parquet
  - split: validation
    path: subset_a/validation-*.parquet
- config_name: subset_b
  data_files:
  - split: train
    path: subset_b/train-*.parquet
---
# multi: two subsets
"""


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(plain, multi): the two dataset folders, absolute."""
    root = tmp_path_factory.mktemp("datasets")
    _parquet(root / "plain/data/train-00000-of-00001.parquet", TRAIN)
    _parquet(root / "plain/data/validation-00000-of-00001.parquet", VALID)
    _parquet(root / "multi/subset_a/train-00000-of-00001.parquet", SUB_A)
    _parquet(root / "multi/subset_a/validation-00000-of-00001.parquet", SUB_A_VALID)
    _parquet(root / "multi/subset_b/train-00000-of-00001.parquet", SUB_B)
    (root / "multi/README.md").write_text(README)
    return str(root / "plain"), str(root / "multi")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No Hub, and the datasets cache in this test's folder."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def _one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_names_subsets_and_splits_but_never_splits_a_path(tmp_path):
    assert parse("org/name:subset") == DataRef("org/name", "subset")
    assert parse("org/name:sub[validation]") == DataRef("org/name", "sub", "validation")
    assert parse("org/name[train[:10%]]") == DataRef("org/name", None, "train[:10%]")
    assert str(DataRef("org/name", "sub", "train")) == "org/name:sub[train]"
    odd = tmp_path / "odd:name"
    odd.mkdir()
    for path in (str(odd), "C:/data/x", "rows:v2.jsonl", str(tmp_path / "a:b.parquet")):
        assert parse(path) == DataRef(path)
    (tmp_path / "a:b.jsonl").write_text("{}\n")
    assert is_local(str(tmp_path / "a:b.jsonl")) and is_local("rows:v2.jsonl") and is_local("./missing")
    assert not is_local("org/name") and not is_local(str(odd)) and not is_local(f"{odd}:subset")


def test_picks_the_subset_and_the_split(folders):
    plain, multi = folders
    assert read_rows(plain)[0] == TRAIN  # train by default
    assert read_rows(plain, "validation")[0] == VALID
    assert read_rows(f"{multi}:subset_a", "validation")[0] == SUB_A_VALID
    records, numbers, report = read_rows(f"{multi}:subset_b[train]")
    assert records == SUB_B and numbers == list(range(1, 21))
    assert report.source == f"{multi}:subset_b[train]" and report.unit == "row"


def test_dataset_rows_get_the_file_checks(tmp_path):
    rows = [dict(r) for r in TRAIN[:10]]
    rows[3]["completion"] = ""  # an empty target: dropped, by row number, as in a file
    _parquet(tmp_path / "ds/data/train-00000-of-00001.parquet", rows)
    kept, fmt, report = load_checked(str(tmp_path / "ds"))
    assert fmt.describe() == "pair(prompt -> completion)" and len(kept) == 9
    assert [b.line for b in report.bad] == [4] and report.total == 10


def _read(src: Sources):
    cfg = SimpleNamespace(input_field=None, target_field=None, data_format=None, on_bad_row="skip", seed=0)
    return _rows(cfg, src)


def test_the_validation_split_is_the_default_eval(folders):
    plain, multi = folders
    assert resolve(plain) == (f"{plain}[train]", f"{plain}[validation]")
    assert resolve(f"{multi}:subset_a") == (f"{multi}:subset_a[train]", f"{multi}:subset_a[validation]")
    train, held, _, reports = _read(Sources("m", *resolve(f"{multi}:subset_a")))
    assert [r for r, _ in train] == SUB_A and [r for r, _ in held] == SUB_A_VALID
    assert reports["eval"].source == f"{multi}:subset_a[validation]"
    # trained on validation: not evaluated on it too; no other validation split: held out
    assert resolve(plain, split="validation") == (f"{plain}[validation]", None)


def test_without_a_validation_split_a_share_is_held_out(folders):
    _, multi = folders
    assert resolve(f"{multi}:subset_b") == (f"{multi}:subset_b[train]", None)
    train, held, _, reports = _read(Sources("m", *resolve(f"{multi}:subset_b")))
    assert len(held) == 1 and len(train) == 19 and set(reports) == {"train"}
    assert sorted(r["prompt"] for r, _ in train + held) == sorted(r["prompt"] for r in SUB_B)


def test_eval_split_and_another_eval_dataset(folders, tmp_path):
    plain, multi = folders
    assert resolve(plain, eval_split="train[:5]", split="train[5:]") == (f"{plain}[train[5:]]", f"{plain}[train[:5]]")
    assert resolve(plain, f"{multi}:subset_a") == (f"{plain}[train]", f"{multi}:subset_a[validation]")
    assert resolve(plain, f"{multi}:subset_b") == (f"{plain}[train]", f"{multi}:subset_b[train]")
    assert resolve(plain, f"{multi}:subset_a", eval_split="train")[1] == f"{multi}:subset_a[train]"
    local = tmp_path / "eval.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in VALID))
    assert resolve(plain, str(local)) == (f"{plain}[train]", str(local))
    assert resolve(str(local), f"{multi}:subset_a") == (str(local), f"{multi}:subset_a[validation]")


def test_a_wrong_subset_or_split_is_one_line_naming_those_that_exist(folders):
    plain, multi = folders
    _one_line_error(rf"^split 'tst' of {plain}: not found; splits: train, validation$", resolve, plain, split="tst")
    _one_line_error(r"split 'tst' of .*: not found; splits: train, validation$", read_rows, plain, "tst")
    _one_line_error(r"split 'tst' of .*plain: not found", resolve, plain, eval_split="tst")
    _one_line_error(rf"^split 'validation' of {multi}:subset_b: not found; splits: train$", read_rows,
                    f"{multi}:subset_b[validation]")
    _one_line_error(rf"^subset 'subset_c' of {multi}: not found; subsets: subset_a, subset_b$", resolve,
                    f"{multi}:subset_c")
    _one_line_error(r"subset 'subset_c' of .*: not found; subsets: subset_a, subset_b$", read_rows, f"{multi}:subset_c")
    _one_line_error(r"several subsets: subset_a, subset_b; name one as .*multi:SUBSET", resolve, multi)
    _one_line_error(r"subset 'x' of .*plain: not found; subsets: default", resolve, plain, f"{plain}:x")
    _one_line_error(r"is the split trained on", resolve, plain, eval_split="train")


def test_flags_that_do_not_apply_and_datasets_that_do_not_load(folders, tmp_path):
    plain, _ = folders
    local = tmp_path / "d.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    _one_line_error("--split picks a split of a dataset", resolve, str(local), split="train")
    _one_line_error("--eval-split picks a split of a dataset", resolve, str(local), eval_split="validation")
    _one_line_error(r"names split 'train' and --split 'validation'", resolve, f"{plain}[train]", split="validation")
    _one_line_error(r"d.jsonl is a file", read_rows, f"{local}:subset")
    _one_line_error(r"^dataset 'no-such-org/no-such-data': not a local file and not loadable from the Hub",
                    read_rows, "no-such-org/no-such-data")
    _one_line_error(r"^dataset 'no-such-org/no-such-data:sub': not a local file and not loadable from the Hub",
                    resolve, "no-such-org/no-such-data:sub")
    _one_line_error(r"^dataset folder .*missing'?: not loadable", resolve, str(tmp_path / "missing") + ":sub")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama with the demo's tokenizer (as tests/flax_lora/training/test_build.py makes it)."""
    from transformers import LlamaConfig

    from flax_lora.models import hub
    from flax_lora.models.decoder import causal_lm_from_config

    d = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=32, max_position_embeddings=64, bos_token_id=1,
                      eos_token_id=1, pad_token_id=0)
    hub.save_pt_safetensors(d / "model", causal_lm_from_config(cfg, seed=0).params, cfg)
    demo.save_tokenizer(demo.build_tokenizer(), d / "model")
    return d / "model"


def test_the_advice_counts_the_split_trained_on(folders, llama_dir):
    from flax_lora.training.config import advice_for

    plain, multi = folders
    for data, split, n in ((plain, None, len(TRAIN)), (plain, "validation", len(VALID)), (f"{multi}:subset_b", None, len(SUB_B))):
        advice, note = advice_for(str(llama_dir), data, split=split)
        assert advice.request.samples == n and f"[{split or 'train'}] is a dataset" in note


@pytest.mark.slow
def test_lora_train_on_a_dataset_subset_records_its_splits(folders, llama_dir, tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    _, multi = folders
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--model", str(llama_dir), "--data", f"{multi}:subset_a",
                                   "--output", str(out), "--max-steps", "2", "--max-length", "32", "-q"])
    assert res.exit_code == 0, res.output
    resolved = json.loads((out / "resolved.json").read_text())
    assert resolved["data_path"] == f"{multi}:subset_a[train]"
    assert resolved["eval_data_path"] == f"{multi}:subset_a[validation]"
    assert resolved["train_examples"] == len(SUB_A) and resolved["eval_examples"] == len(SUB_A_VALID)
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["source"] == f"{multi}:subset_a[train]" and report["train"]["rows"] == len(SUB_A)
    assert report["eval"]["source"] == f"{multi}:subset_a[validation]" and report["eval"]["rows"] == len(SUB_A_VALID)
