"""Read each config source into an Arrow dataset of normalised rows, every invalid row kept with its problems.

A row may carry `expected`: the key fact a right answer contains (e.g. "Brennhaven"). Training ignores it;
`lorafit compare` and the run's held-out answers score answers by it (lorafit.inference.keyfacts).

Rows that cannot be used stay in the dataset (with `problems` set) so the report can name each one by
file:line, field and reason; the dataset is cached by the files' size and mtime, so a second run over the
same files does not read them again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from lorafit.data.formats import FORMATS, detect_format, normalize
from lorafit.data.readers import expand_source, file_signature, read_rows
from lorafit.errors import DataError
from lorafit.hf_compat import dataset_fingerprint
from lorafit.paths import data_cache_dir

MAX_LISTED = 20  # problems listed in an error; the total is always given
PIPELINE_VERSION = "7"  # bump when the stored output changes, so old caches are not reused


@dataclass
class SourceData:
    path: str
    format: str | None
    dataset: object  # datasets.Dataset with messages, text, loc, problems
    rows: int
    invalid: int
    weight: float = 1.0
    problems: list[str] = field(default_factory=list)  # first MAX_LISTED as "loc: `field`: reason"
    unused: dict[str, int] = field(default_factory=dict)  # column (or `messages[].key`) not used -> rows that have it


def stable_hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode() if not isinstance(p, (bytes, bytearray)) else bytes(p))
    return h.hexdigest()[:24]


# -- reading --------------------------------------------------------------------------------------


def _features():
    from datasets import Features, List, Value

    # messages and tools are stored as JSON strings: Arrow <-> Python conversion of nested structs is ~5x slower.
    return Features(
        {
            "messages": Value("string"),
            "text": Value("string"),
            "tools": Value("string"),
            "expected": Value("string"),
            "loc": Value("string"),
            "problems": List(Value("string")),
            "source": Value("int32"),
            "unused": List(Value("string")),
        }
    )


def _mapped(row: dict, columns: dict) -> dict:
    return {columns.get(k, k): v for k, v in row.items()} if columns else row


def detect_source_format(files: list[str], split: str, columns: dict) -> str | None:
    """Form of the first row that has one (rows of one source share a form)."""
    for f in files:
        for _, row, _ in read_rows(f, split):
            if row is not None:
                fmt = detect_format(_mapped(row, columns))
                if fmt:
                    return fmt
    return None


def _generate(files: list[str], split: str, fmt: str | None, columns: dict, source: int, signature):
    keys = "messages | conversations | instruction+output | prompt+completion | text"
    for f in files:
        for loc, row, problem in read_rows(f, split):
            record = {
                "messages": None,
                "text": None,
                "tools": None,
                "expected": None,
                "loc": loc,
                "problems": [],
                "source": source,
                "unused": [],
            }
            if problem is not None:
                record["problems"] = [f"(row): {problem}"]
                yield record
                continue
            row = _mapped(row, columns)
            expected, reason = _expected(row)
            record["expected"] = expected
            if fmt is None:
                record["problems"] = [
                    f"(row): no known format: keys {sorted(row)[:8]} (expected {keys}); map yours with `columns:`"
                ]
                yield record
                continue
            n = normalize(row, fmt)
            problems = [f"`{fld}`: {reason}" for fld, reason in n.problems]
            other = detect_format(row) if problems else None
            if other and other != fmt:  # e.g. one ShareGPT row in a `messages` file
                problems.append(f"(row): this row is in {other} form but the source is {fmt}; use one form per source")
            if reason:
                problems.append(f"`expected`: {reason}")
            record.update(
                messages=json.dumps(n.messages, ensure_ascii=False) if n.messages else None,
                text=n.text,
                tools=json.dumps(n.tools, ensure_ascii=False) if n.tools else None,
                problems=problems,
                unused=n.unused,
            )
            yield record


def _expected(row: dict) -> tuple[str | None, str | None]:
    """(the key fact, a problem): optional; when present, a non-empty string."""
    value = row.get("expected")
    if value is None:
        return None, None
    if not isinstance(value, str) or not value.strip():
        return None, (
            f"expected a non-empty string (the key fact a right answer contains), got "
            f"{type(value).__name__ if not isinstance(value, str) else 'an empty string'}"
        )
    return value.strip(), None


def _unused_counts(ds) -> dict[str, int]:
    """Rows per unused column, counted in Arrow."""
    import pyarrow.compute as pc

    names = pc.list_flatten(ds.data.column("unused"))
    if not len(names):
        return {}
    counts = pc.value_counts(names).to_pylist()
    return dict(sorted(((c["values"], int(c["counts"])) for c in counts), key=lambda kv: (-kv[1], kv[0])))


def read_source(spec, index: int = 0) -> SourceData:
    """One config source as an Arrow dataset of normalised rows; each invalid row keeps its problems."""
    import datasets
    import pyarrow.compute as pc

    files = expand_source(spec.path)
    fmt = spec.format if spec.format != "auto" else detect_source_format(files, spec.split, spec.columns)
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"unknown format `{fmt}` for {spec.path}.", f"Use one of {', '.join(FORMATS)} or auto.")
    signature = file_signature(files)
    kwargs = {
        "files": files,
        "split": spec.split,
        "fmt": fmt,
        "columns": dict(spec.columns),
        "source": index,
        "signature": signature,
    }
    fingerprint = stable_hash("read", PIPELINE_VERSION, kwargs)
    try:
        ds = datasets.Dataset.from_generator(
            _generate, features=_features(), gen_kwargs=kwargs, cache_dir=data_cache_dir(), fingerprint=fingerprint
        )
    except Exception as err:  # datasets wraps what the generator raises (DatasetGenerationError): show ours as is
        cause = err
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None
    counts = pc.list_value_length(ds.data.column("problems")).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(counts > 0)
    problems = []
    for i in bad[:MAX_LISTED].tolist():
        row = ds[i]
        problems += [f"{row['loc']}: {p}" for p in row["problems"]]
    return SourceData(
        spec.path, fmt, ds, len(ds), int(len(bad)), spec.weight, problems[:MAX_LISTED], _unused_counts(ds)
    )


def raise_for_problems(sources: list[SourceData], what: str) -> None:
    total = sum(s.invalid for s in sources)
    if not total:
        return
    listed = [p for s in sources for p in s.problems][:MAX_LISTED]
    lines = [
        f"{total} invalid row(s) in the {what} data"
        + (f" (the first {len(listed)} shown):" if total > len(listed) else ":")
    ]
    lines += [f"  {p}" for p in listed]
    raise DataError(
        "\n".join(lines),
        "Fix these rows, or set `data.skip_invalid: true` to skip them (they are counted and reported).",
    )


def valid_rows(sources: list[SourceData]):
    """The valid rows of all sources in one dataset (an index view over the Arrow files, no copy)."""
    import datasets
    import pyarrow.compute as pc

    parts = []
    for s in sources:
        counts = pc.list_value_length(s.dataset.data.column("problems")).to_numpy(zero_copy_only=False)
        good = np.flatnonzero(counts == 0)
        parts.append(
            s.dataset.select(good, new_fingerprint=stable_hash(dataset_fingerprint(s.dataset), "valid"))
            if len(good) < len(s.dataset)
            else s.dataset
        )
    merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return merged
