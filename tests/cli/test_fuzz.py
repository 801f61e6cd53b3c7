"""Property-based fuzzing of the real `lora` click group: random arguments never end in a traceback.

Every command's options are read from click itself, so commands added later are fuzzed too.
Commands that would do real work when given valid input (train, eval, generate, export) get one
argument that is certainly invalid somewhere in their argument list: the parse layer is fuzzed
without ever starting a training run. Their bad-file handling is covered in test_bad_inputs.py.
"""

from __future__ import annotations

import importlib
import json

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.main import COMMANDS, cli

LIGHT = ("advise", "recipes", "diagnose")  # cheap to run to completion with any input
HEAVY = ("train", "eval", "generate", "export")
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SCALARS = ["1", "0", "-1", "", "2", "3", "7", "0.5", "1e-4", "2e-4", "1.0", "1e309", "-0", "nan", "inf", "-inf",
           "99999999999999999999", "abc", "auto", "gpt2", "12", "0.2", "--", "-", "ü", "a,b,,c", "q_proj,v_proj",
           " ", "1B", "350M", "big", "true"]


USUAL = {"advise": ("samples", "vram")}  # options nearly every real call has


def available() -> list[str]:
    names = []
    for name, target in COMMANDS.items():
        module = target.split(":")[0]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        names.append(name)
    return names


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A pool of paths: missing, a directory, empty, garbage, wrong extension, valid and bogus runs."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "dir").mkdir()
    (root / "empty.jsonl").write_bytes(b"")
    (root / "garbage.jsonl").write_bytes(b"\x00\xff\xfe not json {\n")
    (root / "csv_in_disguise.jsonl").write_text("prompt,completion\na,b\n")
    (root / "parquet.parquet").write_text("this is not parquet")
    (root / "ok.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n"
                                           for i in range(5)))
    (root / "nonsense_advice.json").write_text('{"schema_version": "1", "lora": {"r": -4}}')
    (root / "list.json").write_text("[1, 2, 3]")
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3 - s / 100}) + "\n"
                                               for s in range(10, 200, 10)))
    from advisor import advise

    (run / "advice.json").write_text(advise(samples=200, vram_gb=8).to_json())
    bad_run = root / "bad_run"
    bad_run.mkdir()
    (bad_run / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{oops\n{"step": 3, "loss": 1}\n')
    (bad_run / "eval.json").write_text("{")
    pool = [str(root / n) for n in ("missing", "dir", "empty.jsonl", "garbage.jsonl", "csv_in_disguise.jsonl",
                                    "parquet.parquet", "ok.jsonl", "nonsense_advice.json", "list.json", "run",
                                    "bad_run", "dir/new.json", "missing/deeper/x.json")]
    return root, pool


@pytest.fixture(autouse=True)
def _isolated(paths, monkeypatch):
    monkeypatch.chdir(paths[0])  # relative outputs land in the temp folder, never the repo
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network waits
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def params_of(name: str) -> list[click.Parameter]:
    with click.Context(cli) as ctx:
        command = cli.get_command(ctx, name)
    return [p for p in command.params if p.name not in ("help",)]


def value_strategy(param: click.Parameter, pool: list[str]) -> st.SearchStrategy[str]:
    """Mostly valid values for the option's type (to get past parsing), else anything from the pools."""
    anything = st.sampled_from(SCALARS + pool)
    t = param.type
    if isinstance(t, click.Choice):
        valid = st.sampled_from(list(t.choices) + [c.upper() for c in t.choices])
    elif isinstance(t, click.types.IntParamType) or getattr(t, "name", "") == "integer":
        lo = getattr(t, "min", None)
        lo = -5 if lo is None else lo
        hi = getattr(t, "max", None)
        valid = st.integers(lo, hi if hi is not None else lo + 5000).map(str)
    elif isinstance(t, click.types.FloatParamType) or getattr(t, "name", "") in ("float", "GB|auto"):
        lo = getattr(t, "min", None)
        hi = getattr(t, "max", None)
        valid = st.floats(lo if lo is not None else 0.5, hi if hi is not None else 200.0,
                          allow_nan=False).map(lambda x: f"{x:g}")
    else:
        valid = anything
    # Hypothesis favours small integers, so the rare branch is the large one.
    return st.integers(0, 9).flatmap(lambda i: anything if i == 9 else valid)


@st.composite
def argv(draw, name: str, pool: list[str], certainly_invalid: bool):
    """A random argument list for one command: options in random order, positionals from the pool."""
    args: list[str] = []
    options = [p for p in params_of(name) if isinstance(p, click.Option)]
    usual = USUAL.get(name, ())
    chosen = [p for p in options if (p.required or p.name in usual) and draw(st.integers(0, 9)) < 9]
    chosen += draw(st.lists(st.sampled_from(options), max_size=4)) if options else []
    for param in chosen:
        args.append(draw(st.sampled_from(param.opts + param.secondary_opts)))
        if not param.is_flag:
            args.append(draw(value_strategy(param, pool)))
    if args and draw(st.integers(0, 19)) == 19:
        args.pop()  # an option left without its value
    for param in params_of(name):
        if isinstance(param, click.Argument) and draw(st.integers(0, 9)) < 9:
            positional = st.one_of(st.sampled_from(pool), st.sampled_from(pool), st.sampled_from(SCALARS))
            args.insert(draw(st.integers(0, len(args))), draw(positional))
    if draw(st.integers(0, 19)) == 19:
        args.append(draw(st.sampled_from(SCALARS)))  # a stray extra argument
    if certainly_invalid:
        bad = draw(st.sampled_from(["--no-such-option", "--no-such-option=1"]))
        args.insert(draw(st.integers(0, len(args))), bad)
    return args


def check(result, args):
    shown = f"lora {' '.join(args)!s}\n{result.output}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"unexpected {type(result.exception).__name__}: {result.exception}\n{shown}") \
            from result.exception
    assert "Traceback" not in result.output, shown
    assert result.exit_code in (0, 2), shown
    if result.exit_code == 2:
        assert result.stderr.strip(), shown  # an error says something


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=True)


@pytest.mark.parametrize("name", [n for n in LIGHT])
def test_light_commands_never_leak_a_traceback(name, paths):
    if name not in available():
        pytest.skip(f"{name} not built")

    @SETTINGS
    @given(args=argv(name, paths[1], certainly_invalid=False))
    def fuzz(args):
        result = run([name, *args])
        check(result, [name, *args])
        if result.exit_code == 2 and name != "recipes":
            # The subcommands' own errors are one line, never click's usage block.
            assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.output

    fuzz()


@pytest.mark.parametrize("name", HEAVY)
def test_heavy_commands_reject_bad_arguments_cleanly(name, paths):
    if name not in available():
        pytest.skip(f"{name} not built")

    @settings(SETTINGS, max_examples=30)
    @given(args=argv(name, paths[1], certainly_invalid=True))
    def fuzz(args):
        result = run([name, *args])
        check(result, [name, *args])
        assert result.exit_code == 2, result.output

    fuzz()


@SETTINGS
@given(args=st.lists(st.sampled_from(SCALARS + ["--help", "--version", "-h", "nope", "advise", "diagnose"]),
                     max_size=3))
def test_group_level_arguments(args):
    check(run(args), args)
