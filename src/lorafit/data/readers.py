"""Read raw rows from every supported source, keeping where each row came from (file:line or file row N).

A reader yields (loc, row, problem): a dict row, or a problem string when the row cannot even be parsed
(broken JSON, invalid UTF-8, not an object, empty file). Nothing is ever skipped silently.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from lorafit.errors import DataError
from lorafit.paths import user_path

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape decodes an invalid UTF-8 byte to
MAX_CSV_FIELD = 64 * 2**20  # csv's default 128 KiB cell limit would refuse long documents as "broken CSV"
Raw = tuple[str, "dict | None", "str | None"]  # (loc, row, problem)


def expand_source(path: str) -> list[str]:
    """Files (or one save_to_disk folder, or one Hub id prefixed `hub:`) that a source path names."""
    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(os.path.expanduser(path), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"no file matches the data path `{path}`.", "Check the pattern (quote it in the shell).")
        return [_checked_file(f) for f in files]
    p = user_path(path)
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return [str(p)]
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSIONS)
        if not files:
            raise DataError(
                f"data folder {p} holds no {', '.join(EXTENSIONS)} file and is not a `save_to_disk` folder."
            )
        return files
    if p.exists():
        return [_checked_file(str(p))]
    if path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(path).suffix:
        return ["hub:" + path]
    raise DataError(
        f"data file {path} does not exist.",
        "Check the path in `data.train` (relative paths are relative to the config file).",
    )


def _checked_file(path: str) -> str:
    if Path(path).suffix.lower() not in EXTENSIONS:
        raise DataError(
            f"data file {path}: unsupported type `{Path(path).suffix}`.", f"Use one of {', '.join(EXTENSIONS)}."
        )
    return path


def file_signature(files: list[str]) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of each file: part of the cache key, so an edited file is read again."""
    out = []
    for f in files:
        target = Path(f[4:] if f.startswith("hub:") else f)
        if target.is_dir():
            stats = [p.stat() for p in sorted(target.rglob("*")) if p.is_file()]
            out.append((f, sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)))
        elif target.exists():
            st = target.stat()
            out.append((f, st.st_size, st.st_mtime_ns))
        else:
            out.append((f, 0, 0))
    return out


def read_rows(file: str, split: str = "train") -> Iterator[Raw]:
    if file.startswith("hub:"):
        yield from _read_hub(file[4:], split)
        return
    p = Path(file)
    if p.is_dir():
        yield from _read_saved(p, split)
        return
    suffix = p.suffix.lower()
    reader = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".tsv": _read_csv,
        ".parquet": _read_parquet,
    }[suffix]
    count = 0
    for item in reader(p):
        count += 1
        yield item
    if count == 0:
        yield str(p), None, "empty file: no rows"


def _read_jsonl(p: Path) -> Iterator[Raw]:
    with open(p, "rb") as fh:
        for number, line in enumerate(fh, 1):
            loc = f"{p}:{number}"
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield loc, None, f"invalid UTF-8 at byte {err.start} of the line"
                continue
            try:
                row = json.loads(text)
            except (ValueError, RecursionError) as err:  # also nesting too deep, integers over 4300 digits
                yield loc, None, _json_problem(err)
                continue
            if not isinstance(row, dict):
                yield loc, None, f"expected a JSON object per line, got {type(row).__name__}"
                continue
            yield loc, row, None


def _read_json(p: Path) -> Iterator[Raw]:
    # surrogateescape: a bad byte only spoils the row that holds it, which is then named.
    text = p.read_bytes().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    if not text.strip():
        return
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as err:  # also nesting too deep, integers over 4300 digits
        yield f"{p}:{getattr(err, 'lineno', 1)}", None, f"{_json_problem(err)}; the whole file is unreadable"
        return
    bad = _has_surrogates(text)  # once for the file: dumping every row to look costs ~20 us a row
    for index, row in enumerate(_json_rows(obj)):
        loc = f"{p}: row {index + 1}"
        if not isinstance(row, dict):
            yield loc, None, f"expected an object per row, got {type(row).__name__}"
        elif bad and _has_surrogates(json.dumps(row, ensure_ascii=False, default=str)):
            yield loc, None, "invalid UTF-8"
        else:
            yield loc, row, None


def _json_problem(err: Exception) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"broken JSON: {err.msg} (column {err.colno})"
    if isinstance(err, RecursionError):
        return "unreadable JSON: nested too deeply"
    return f"unreadable JSON: {str(err).split(':')[0][:120]}"  # e.g. an integer over 4300 digits


def _json_rows(obj) -> list:
    """An array of rows; {name: [rows]} (one list); {column: [values]} (columns); or {id: row}."""
    if isinstance(obj, list):
        return obj
    if not isinstance(obj, dict):
        return [obj]
    lists = {k: v for k, v in obj.items() if isinstance(v, list)}
    if len(lists) == 1 and len(obj) == 1 and all(isinstance(r, dict) for r in next(iter(lists.values()))):
        return next(iter(lists.values()))
    if lists and len(lists) == len(obj) and len({len(v) for v in lists.values()}) == 1:
        n = len(next(iter(lists.values())))
        return [{k: v[i] for k, v in obj.items()} for i in range(n)]
    if obj and all(isinstance(v, dict) for v in obj.values()):
        return list(obj.values())
    return [obj]


def _read_csv(p: Path) -> Iterator[Raw]:
    delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(max(csv.field_size_limit(), MAX_CSV_FIELD))
    # surrogateescape keeps reading past a bad byte so the row holding it can be named.
    with open(p, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        start = 2
        try:
            for row in reader:
                loc = f"{p}:{start}"
                start = reader.line_num + 1
                if None in row:
                    yield loc, None, f"{len(row[None])} more field(s) than the header has"
                    continue
                if any(isinstance(v, str) and _has_surrogates(v) for v in row.values()):
                    yield loc, None, "invalid UTF-8"
                    continue
                yield loc, {k: v for k, v in row.items() if v is not None}, None
        except csv.Error as err:
            yield f"{p}:{reader.line_num}", None, f"broken CSV: {err}"


def _has_surrogates(text: str) -> bool:
    return BAD_BYTE.search(text) is not None  # a regex, not a Python loop per character: 30 MB cells exist


def _read_parquet(p: Path) -> Iterator[Raw]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError ... for a damaged file
        yield str(p), None, f"unreadable Parquet file ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
        return
    index = 0
    try:
        for batch in pf.iter_batches(batch_size=1000):
            for row in batch.to_pylist():
                index += 1
                yield f"{p}: row {index}", row, None
    except Exception as err:  # a damaged page, or invalid UTF-8 in a string column, found only when read
        reason = " ".join(str(err).split())[:200]  # one line: pyarrow's messages span several
        yield (
            f"{p}: row {index + 1}",
            None,
            f"unreadable Parquet data from this row on ({type(err).__name__}: {reason})",
        )


def _read_saved(p: Path, split: str) -> Iterator[Raw]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as err:  # datasets raises FileNotFoundError, ValueError ... for a foreign folder
        raise DataError(
            f"{p} is not a readable `save_to_disk` folder ({type(err).__name__}: {str(err)[:200]})."
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{p} has no split `{split}` (it has {', '.join(ds)}).", "Set `split:` on the source.")
        ds = ds[split]
    yield from _iter_dataset(ds, str(p))


def _iter_dataset(ds, name: str) -> Iterator[Raw]:
    index = 0
    for row in ds:
        index += 1
        yield f"{name}: row {index}", dict(row), None


def _read_hub(dataset_id: str, split: str) -> Iterator[Raw]:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataError(
            f"data path `{dataset_id}` is not a local file, and the Hugging Face Hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE).",
            "Use a local file, or go online to load a Hub dataset.",
        )
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split, streaming=True)
    except Exception as err:  # network, auth, missing split: all end as one message
        raise DataError(
            f"Hub dataset `{dataset_id}` (split {split}) could not be loaded: {type(err).__name__}: {str(err)[:300]}",
            "Check the id and split, your network, and `hf auth login` for private datasets.",
        ) from None
    yield from _iter_dataset(ds, f"hub:{dataset_id}")
