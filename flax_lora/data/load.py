"""Training rows from a local file or a dataset (a Hub name or a local dataset folder), checked,
with their bad-row report.

Local files go through the project's one row reader (:mod:`advisor.rows`, shared with
``lora advise --data``); datasets through ``datasets.load_dataset``. Either way the format is
detected and rows are checked by :mod:`advisor.formats`, so the advisor and the trainer see the
same rows.

A dataset is named ``NAME[:SUBSET][[SPLIT]]``: ``org/name``, ``org/name:subset`` (a config of
``datasets``), and, as :func:`resolve` writes it once the split is known, ``org/name:subset[train]``
(any split ``datasets`` accepts, slices too: ``org/name[train[:10%]]``). ``NAME`` may be a local
folder ``datasets`` can load (data files named by split, or a README.md whose YAML ``configs:``
names the subsets). A path that exists, or ends with a data file extension, is never split on
``:`` or ``[``.

Eval rows, when no ``--eval-split`` is given: the training dataset's first split of
:data:`VALIDATION_SPLITS` (never its test split, which stays unseen, nor the split trained on),
else a held-out share of the training rows (:func:`split_eval`); a separate ``--eval-data``
dataset gives its first split of :data:`EVAL_SPLITS` (it was named to evaluate on, so its test
split will do).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from advisor.formats import Format, usable_rows
from advisor.rows import RowReport, read_records
from advisor.schema import DataFormat, RowPolicy
from flax_lora.errors import UserError

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
VALIDATION_SPLITS = ("validation", "valid", "val", "dev")  # the training dataset's eval split, first found
EVAL_SPLITS = VALIDATION_SPLITS + ("test", "train")  # a separate --eval-data dataset's, first found


class DataRef(NamedTuple):
    """A dataset: a Hub name or a local folder, a subset (config) of it, a split of that."""

    name: str
    subset: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        return self.name + (f":{self.subset}" if self.subset else "") + (f"[{self.split}]" if self.split else "")

    @property
    def dataset(self) -> str:
        """The name and subset without the split (what error messages name)."""
        return str(self._replace(split=None))


def _is_path(source: str) -> bool:
    path = Path(source).expanduser()
    return path.exists() or path.suffix.lower() in EXTENSIONS


def _tail_split(source: str) -> tuple[str, str | None]:
    """``name[split]`` -> (name, split), the brackets matched from the end (a split may hold a slice)."""
    if not source.endswith("]"):
        return source, None
    depth = 0
    for i in range(len(source) - 1, -1, -1):
        depth += {"]": 1, "[": -1}.get(source[i], 0)
        if depth == 0:
            return (source[:i], source[i + 1:-1] or None) if i else (source, None)
    return source, None


def parse(source: str) -> DataRef:
    """``NAME[:SUBSET][[SPLIT]]`` as a DataRef; a path that exists or ends with a data extension is
    all name (a local path is never split on ``:``). A subset holds no slash (``C:/x`` stays whole)."""
    if _is_path(source):
        return DataRef(source)
    head, split = _tail_split(source)
    if _is_path(head) or ":" not in head:
        return DataRef(head, None, split)
    name, subset = head.rsplit(":", 1)
    if not name or not subset or "/" in subset or "\\" in subset:
        return DataRef(head, None, split)
    return DataRef(name, subset, split)


def is_local(source: str) -> bool:
    """Whether ``source`` names a local data file, read by :mod:`advisor.rows` (else: a dataset, a Hub
    name or a local dataset folder, read by ``datasets``). A path-like name that does not exist is a
    file (its error says "not found", not "not on the Hub")."""
    path = Path(source).expanduser()
    if path.exists():
        return not path.is_dir()
    if path.suffix.lower() in EXTENSIONS:
        return True
    if parse(source) != DataRef(source):  # NAME:SUBSET or NAME[SPLIT]: a dataset
        return False
    return source.startswith((".", "/", "~"))


def _folder_or_name(name: str) -> str:
    """A local dataset folder as an absolute path (it is loaded from anywhere); a Hub name as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def _dataset_name(ref: DataRef) -> str:
    """What ``datasets`` is given for ``ref``; a local file named with a subset or split is a UserError."""
    name = _folder_or_name(ref.name)
    if Path(name).expanduser().is_file() or Path(name).suffix.lower() in EXTENSIONS:
        raise UserError(f"{ref}: {ref.name} is a file; a subset (:SUBSET) or split names part of a dataset "
                        "(a Hub name or a dataset folder)")
    return name


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _unloadable(ref: DataRef, exc: Exception) -> UserError:
    """Today's one line for a dataset that cannot be loaded at all (a folder's says what went wrong)."""
    if Path(ref.name).expanduser().is_dir() or ref.name.startswith((".", "/", "~")):
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return UserError(f"dataset folder {ref.name!r}: not loadable ({type(exc).__name__}: {first})")
    return UserError(f"dataset {ref.dataset!r}: not a local file and not loadable from the Hub ({type(exc).__name__})")


def _join(names) -> str:
    return ", ".join(names) or "none"


def dataset_splits(ref: DataRef) -> list[str]:
    """The split names of ``ref``'s dataset and subset (a metadata read, not the rows); a subset
    that does not exist, or a missing one where there are several, is a UserError naming them."""
    ds = _datasets()
    name = _dataset_name(ref)
    try:
        subsets = list(ds.get_dataset_config_names(name))
    except Exception as exc:
        raise _unloadable(ref, exc) from None
    if ref.subset is not None and ref.subset not in subsets:
        raise UserError(f"subset {ref.subset!r} of {ref.name}: not found; subsets: {_join(subsets)}")
    try:
        return list(ds.get_dataset_split_names(name, ref.subset))
    except Exception as exc:
        if ref.subset is None and len(subsets) > 1:
            raise UserError(f"{ref.name} has several subsets: {_join(subsets)}; name one as {ref.name}:SUBSET") from None
        raise _unloadable(ref, exc) from None


def check_split(ref: DataRef, splits: list[str]) -> None:
    """A UserError naming ``splits`` when ``ref.split`` (``a``, ``a[:10%]``, ``a+b``) names one
    that is not among them."""
    for part in (ref.split or "").split("+"):
        base = re.sub(r"\[.*$", "", part).strip()
        if base and base not in splits:
            raise UserError(f"split {base!r} of {ref.dataset}: not found; splits: {_join(splits)}")


def _read_dataset(ref: DataRef) -> tuple[list[dict], list[int], RowReport]:
    """Rows of one split of a dataset (``ref.split`` set). When ``datasets`` fails, the subset and
    split are checked against the ones that exist, so the error names them instead of a traceback."""
    name = _dataset_name(ref)
    try:
        table = _datasets().load_dataset(name, ref.subset, split=ref.split)
    except Exception as exc:
        check_split(ref, dataset_splits(ref))  # a wrong subset or split: its own line
        raise _unloadable(ref, exc) from None
    rows = table.to_list()
    return rows, list(range(1, len(rows) + 1)), RowReport(str(ref._replace(name=name)), "row", total=len(rows))


def read_rows(source: str, split: str | None = None) -> tuple[list[dict], list[int], RowReport]:
    """(records, their line/row numbers, report of the unreadable ones) of a local file or a split
    of a dataset: the split ``source`` names (``NAME[:SUBSET][[SPLIT]]``), else ``split``, else train.

    Local files are parsed row by row by :mod:`advisor.rows`, so one bad line is reported by
    number instead of sinking the file; a file that is not what its extension says is a UserError.
    ``split`` does not apply to a local file.
    """
    if is_local(source):
        return read_records(Path(source).expanduser())
    ref = parse(source)
    return _read_dataset(ref._replace(split=ref.split or split or "train"))


def load_checked(source: str, *, fmt: Format | None = None, input_field: str | None = None,
                 target_field: str | None = None, name: DataFormat | None = None, policy: RowPolicy = "skip",
                 split: str | None = None) -> tuple[list[tuple[dict, int]], Format, RowReport]:
    """Usable ``(row, line number)`` pairs of ``source`` (``split``: as :func:`read_rows`), its
    format, and the bad-row report (:func:`advisor.formats.usable_rows` on the rows
    :func:`read_rows` reads: a dataset's rows get the same checks as a file's)."""
    records, numbers, report = read_rows(source, split)
    rows, fmt = usable_rows(records, numbers, report, fmt=fmt, input_field=input_field,
                            target_field=target_field, name=name, policy=policy)
    return rows, fmt, report


def _as_dataset(source: str, split: str | None, flag: str) -> DataRef | None:
    """``source`` as a DataRef (a folder made absolute, ``split`` applied), or None for a local file.
    ``flag`` (``--split``, ``--eval-split``) with a local file, or against the split ``source``
    names, is a UserError: a flag that would be ignored is a mistake to say, not to guess past."""
    if is_local(source):
        if split:
            raise UserError(f"{flag} picks a split of a dataset (a Hub name or a dataset folder); "
                            f"{source} is a local file")
        return None
    ref = parse(source)
    if split and ref.split and split != ref.split:
        raise UserError(f"{source} names split {ref.split!r} and {flag} {split!r}: give one")
    return ref._replace(name=_folder_or_name(ref.name), split=split or ref.split)


def _checked(ref: DataRef) -> list[str]:
    """``ref``'s dataset's splits, its subset and split checked against them (one line if wrong)."""
    splits = dataset_splits(ref)
    check_split(ref, splits)
    return splits


def _first(preferred: tuple[str, ...], splits: list[str], skip: str | None = None) -> str | None:
    return next((s for s in preferred if s in splits and s != skip), None)


def _eval_of_other(ref: DataRef) -> str:
    """A separate eval dataset with its split explicit: the one given, else its first of EVAL_SPLITS."""
    splits = _checked(ref)
    if ref.split:
        return str(ref)
    pick = _first(EVAL_SPLITS, splits)
    if pick is None:
        raise UserError(f"{ref.dataset}: no {', '.join(EVAL_SPLITS)} split to evaluate on; splits: {_join(splits)}; "
                        "name one with --eval-split")
    return str(ref._replace(split=pick))


def resolve(data: str, eval_data: str | None = None, *, split: str | None = None,
            eval_split: str | None = None) -> tuple[str, str | None]:
    """(train source, eval source or None) as a run reads and records them: a dataset's folder made
    absolute and its split made explicit (``NAME[:SUBSET][SPLIT]``, what ``resolved.json`` shows);
    a local file as given. An eval source of None means: hold out a share of the training rows
    (:func:`split_eval`). ``split`` defaults to train; ``eval_split`` as the module docstring says.

    Subsets and splits are checked here (a metadata read), so a wrong one fails as one line naming
    the ones that exist before any rows are read.
    """
    train = _as_dataset(data, split, "--split")
    if train is not None:
        train = train._replace(split=train.split or "train")
        splits = _checked(train)
    if eval_data:
        other = _as_dataset(eval_data, eval_split, "--eval-split")
        return (str(train) if train else data), (_eval_of_other(other) if other else eval_data)
    if train is None:
        _as_dataset(data, eval_split, "--eval-split")  # a local file takes no --eval-split
        return data, None
    if eval_split == train.split:
        raise UserError(f"--eval-split {eval_split!r} is the split trained on: the eval would score training rows "
                        "(leave it out to hold out a share of them)")
    if eval_split:
        ev = train._replace(split=eval_split)
        check_split(ev, splits)
        return str(train), str(ev)
    pick = _first(VALIDATION_SPLITS, splits, skip=train.split)
    return str(train), (str(train._replace(split=pick)) if pick else None)


def report_json(report: RowReport, policy: RowPolicy, shown: int = 100) -> dict[str, Any]:
    """A RowReport for ``data_report.json``: counts plus the first ``shown`` bad / truncated lines."""
    return {"source": report.source, "unit": report.unit, "rows": report.total, "bad": len(report.bad),
            "used": report.total - len(report.bad), "truncated": len(report.truncated), "windowed": len(report.split),
            "windows": report.windows, "on_bad_row": policy,
            "bad_rows": [{report.unit: b.line, "reason": b.reason} for b in report.bad[:shown]],
            "truncated_rows": report.truncated[:shown]}


def split_eval(rows: list, fraction: float = 0.05, seed: int = 0) -> tuple[list, list]:
    """(train, eval): a seeded ``fraction`` held out (at least 1 row, at most 200)."""
    if len(rows) < 2:
        raise UserError("need at least 2 rows to hold out an eval set (or pass --eval-data)")
    n_eval = min(max(1, round(len(rows) * fraction)), 200)
    perm = np.random.default_rng([seed, 10_000]).permutation(len(rows))
    held = set(perm[:n_eval].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]
