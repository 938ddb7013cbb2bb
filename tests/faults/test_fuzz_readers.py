"""Hostile data files: each one loads, or ends in DataError naming the file and the line — never another
exception, a hang, or a memory blow-up. Hypothesis drives the readers the way training does
(`read_source` + `raise_for_problems`); examples are derandomized so CI sees the same ones every run.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorafit.config import DataSource
from lorafit.data.formats import ROLES, check_order, detect_format, normalize_row
from lorafit.data.readers import EXTENSIONS, read_rows
from lorafit.data.sources import raise_for_problems, read_source
from lorafit.errors import DataError

from .fuzzkit import FUZZ, NASTY, json_values, lone_surrogate_free, rows, time_limit

NAMES = itertools.count()
PY_HEAP_SLACK = 32 * 2**20  # Python allocations allowed on top of 40x the file size while reading one file


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for all examples (hypothesis reuses fixtures) and an Arrow cache that is not the user's."""
    old = os.environ.get("LORAFIT_DATA_CACHE")
    os.environ["LORAFIT_DATA_CACHE"] = str(tmp_path_factory.mktemp("fuzz_cache"))
    import datasets

    datasets.disable_progress_bars()
    yield tmp_path_factory.mktemp("fuzz")
    datasets.enable_progress_bars()
    if old is None:
        os.environ.pop("LORAFIT_DATA_CACHE", None)
    else:
        os.environ["LORAFIT_DATA_CACHE"] = old


def write(folder: Path, suffix: str, data: bytes) -> Path:
    path = folder / f"f{next(NAMES)}{suffix}"  # a new name each time: the read cache keys on path, size and mtime
    path.write_bytes(data)
    return path


def load(path: Path, fmt: str = "auto"):
    """What training does with one source. Returns the SourceData, or the DataError it ended in."""
    size = path.stat().st_size
    with time_limit():
        tracemalloc.start()
        try:  # the pure-Python part (parse + validate), measured: the Arrow part is bounded by the file
            for _, row, _ in read_rows(str(path)):
                kind = detect_format(row) if row is not None else None
                if kind:
                    normalize_row(row, kind)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < PY_HEAP_SLACK + 40 * size, f"reading {size} bytes took {peak} bytes of Python heap"
        try:
            source = read_source(DataSource(path=str(path), format=fmt))
            raise_for_problems([source], "training")
        except DataError as err:
            assert_names_file_and_line(err, path)
            return err
    assert_rows_usable(source)
    return source


def assert_names_file_and_line(err: DataError, path: Path) -> None:
    lines = err.message.splitlines()
    assert "invalid row" in lines[0], err.message
    listed = lines[1:]
    assert listed, err.message
    for line in listed:  # `path:LINE: ...`, `path: row N: ...`, or `path: ...` for a file unreadable as a whole
        assert re.match(rf"  {re.escape(str(path))}(:\d+| row \d+)?: ", line) or line.startswith(f"  {path}: "), line


def assert_rows_usable(source) -> None:
    """Whatever loaded is what training can use: a conversation in order with text contents, or raw text."""
    assert source.rows > 0
    for row in source.dataset:
        if row["problems"]:
            continue
        if row["text"] is not None:
            assert row["text"].strip() and lone_surrogate_free(row["text"])
            continue
        messages = json.loads(row["messages"])
        assert not check_order(messages)
        for m in messages:
            assert m["role"] in ROLES and isinstance(m["content"], str) and m["content"].strip()
            assert lone_surrogate_free(m["content"])


# -- any bytes at all -------------------------------------------------------------------------------
@FUZZ
@given(
    data=st.binary(max_size=3000)
    | st.lists(st.sampled_from(NASTY) | st.binary(max_size=20), max_size=30).map(b"".join),
    suffix=st.sampled_from(EXTENSIONS),
)
def test_random_bytes_load_or_data_error(workdir, data, suffix):
    load(write(workdir, suffix, data))


# -- JSON Lines and JSON: random shapes, BOMs, newline styles, invalid UTF-8 ---------------------
def _newlines(text: str, style: str) -> str:
    return text.replace("\n", style)


# Whole lines that parse badly on their own: nesting past the recursion limit, a 5000-digit number, NaN.
HOSTILE_LINES = [
    "[" * 3000,
    "[" * 3000 + "]" * 3000,
    '{"a":' * 2000 + "1" + "}" * 2000,
    '{"text": ' + "1" * 5000 + "}",
    '{"text": NaN}',
    '{"text": "\\ud800"}',
    '{"messages": [{"role": "user", "content": "\\udfff"}]}',
    "\x00",
    "\ufeff{}",
]


@FUZZ
@given(
    items=st.lists(rows | json_values, min_size=0, max_size=8),
    newline=st.sampled_from(["\n", "\r\n", "\r", "\n\r\n"]),
    bom=st.booleans(),
    junk=st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(NASTY)), max_size=3),
    hostile=st.lists(st.tuples(st.integers(0, 8), st.sampled_from(HOSTILE_LINES)), max_size=3),
    escape=st.booleans(),
)
def test_jsonl_shapes_load_or_data_error(workdir, items, newline, bom, junk, hostile, escape):
    lines = [json.dumps(item, ensure_ascii=escape) for item in items]
    for at, line in hostile:
        lines.insert(at, line)
    data = _newlines("\n".join(lines) + "\n", newline).encode("utf-8", "surrogatepass")
    for at, fragment in junk:  # splice hostile bytes anywhere
        at %= len(data) + 1
        data = data[:at] + fragment + data[at:]
    load(write(workdir, ".jsonl", (b"\xef\xbb\xbf" if bom else b"") + data))


@FUZZ
@given(
    payload=st.lists(rows, max_size=6)
    | st.dictionaries(
        st.sampled_from(["data", "rows", "a", "b", "prompt", "completion"]),
        st.lists(rows | json_values, max_size=4) | rows,
        max_size=3,
    )
    | json_values,
    indent=st.sampled_from([None, 1, "\t"]),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    bom=st.booleans(),
)
def test_json_shapes_load_or_data_error(workdir, payload, indent, newline, bom):
    text = _newlines(json.dumps(payload, indent=indent, ensure_ascii=False), newline)
    load(write(workdir, ".json", (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass")))


# -- CSV / TSV: quoted newlines, NUL, ragged rows, JSON cells, invalid bytes ------------------------
HEADERS = [
    ["text"],
    ["prompt", "completion"],
    ["instruction", "input", "output"],
    ["messages"],
    ["conversations"],
    ["a", "b"],
    [],
]
cells = (
    st.text(st.characters(codec="utf-8", include_characters='",\t\r\n\x00'), max_size=30)
    | st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "gpt"]), "content": st.text(max_size=10)}),
        max_size=3,
    ).map(json.dumps)
    | st.sampled_from(['"', '""', "[" * 2000, "\r", "\ud800", "1" * 5000])
)


@FUZZ
@given(
    header=st.sampled_from(HEADERS),
    body=st.lists(st.lists(cells, max_size=4), max_size=6),
    terminator=st.sampled_from(["\n", "\r\n", "\r"]),
    suffix=st.sampled_from([".csv", ".tsv"]),
    bom=st.booleans(),
    junk=st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(NASTY)), max_size=2),
)
def test_csv_load_or_data_error(workdir, header, body, terminator, suffix, bom, junk):
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t" if suffix == ".tsv" else ",", lineterminator=terminator)
    for record in [header] + body:
        writer.writerow(record)
    data = out.getvalue().encode("utf-8", "surrogatepass")
    for at, fragment in junk:
        at %= len(data) + 1
        data = data[:at] + fragment + data[at:]
    load(write(workdir, suffix, (b"\xef\xbb\xbf" if bom else b"") + data))


# -- Parquet: unexpected schemas, invalid UTF-8 in a string column, damaged files ------------------
def _column_types():
    import pyarrow as pa

    turn = lambda a, b, ta=pa.string(), tb=pa.string(): pa.list_(pa.struct([(a, ta), (b, tb)]))  # noqa: E731
    role = st.sampled_from(["user", "assistant", "system", "gpt", "human", "x"]) | st.none()
    short = st.text(max_size=12) | st.none()
    return [
        (pa.string(), short),
        (pa.large_string(), short),
        (pa.binary(), st.binary(max_size=12) | st.none()),
        (pa.int64(), st.integers(-(2**63), 2**63 - 1) | st.none()),
        (pa.float64(), st.floats() | st.none()),
        (pa.bool_(), st.booleans()),
        (pa.null(), st.none()),
        (pa.list_(pa.string()), st.lists(short, max_size=3) | st.none()),
        (
            turn("role", "content"),
            st.lists(st.fixed_dictionaries({"role": role, "content": short}), max_size=4) | st.none(),
        ),
        (turn("from", "value"), st.lists(st.fixed_dictionaries({"from": role, "value": short}), max_size=4)),
        (
            turn("role", "content", pa.int32(), pa.binary()),
            st.lists(st.fixed_dictionaries({"role": st.integers(0, 9), "content": st.binary(max_size=5)}), max_size=3),
        ),
        (pa.map_(pa.string(), pa.int64()), st.lists(st.tuples(st.text(max_size=4), st.integers(0, 9)), max_size=3)),
        (pa.timestamp("s"), st.integers(0, 2**31)),
        (pa.list_(pa.list_(pa.int8())), st.lists(st.lists(st.integers(-128, 127), max_size=3), max_size=3)),
    ]


@st.composite
def parquet_tables(draw):
    import pyarrow as pa

    types = _column_types()
    n = draw(st.integers(0, 5))
    names = draw(
        st.lists(
            st.sampled_from(
                [
                    "messages",
                    "conversations",
                    "text",
                    "prompt",
                    "completion",
                    "instruction",
                    "output",
                    "input",
                    "system",
                    "id",
                ]
            ),
            unique=True,
            max_size=4,
        )
    )
    columns = {}
    for name in names:
        kind, values = draw(st.sampled_from(types))
        columns[name] = pa.array([draw(values) for _ in range(n)], type=kind)
    if (
        names and n and draw(st.booleans())
    ):  # a string column whose bytes are not UTF-8 (pyarrow does not check on write)
        raw = b"".join(draw(st.sampled_from([b"ok", b"\xff\xfe", b"\xc3", b"\xed\xa0\x80"])) for _ in range(n))
        offsets = pa.array([min(2 * i, len(raw)) for i in range(n)] + [len(raw)], pa.int32()).buffers()[1]
        columns[names[0]] = pa.Array.from_buffers(pa.string(), n, [None, offsets, pa.py_buffer(raw)])
    return pa.table(columns) if columns else pa.table({"empty": pa.array([], pa.null())})


@FUZZ
@given(
    table=parquet_tables(),
    damage=st.none() | st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=64)),
    cut=st.booleans(),
    fmt=st.sampled_from(["auto", "auto", "messages", "text", "alpaca"]),
)
def test_parquet_load_or_data_error(workdir, table, damage, cut, fmt):
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    if damage is not None:  # overwrite bytes somewhere inside: a damaged page or footer
        where, junk = damage
        at = int(where * max(len(data) - len(junk), 0))
        data = data[:at] + junk + data[at + len(junk) :]
    if cut:
        data = data[: len(data) // 2]
    load(write(workdir, ".parquet", data), fmt)


# -- what should load does load: valid rows survive BOMs and every newline style ----------------------
content = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30).filter(str.strip)


@FUZZ
@given(
    pairs=st.lists(st.tuples(content, content), min_size=1, max_size=5),
    bom=st.booleans(),
    newline=st.sampled_from(["\n", "\r\n"]),
    terminator=st.sampled_from(["\n", "\r\n", "\r"]),
)
def test_valid_rows_load_exactly(workdir, pairs, bom, newline, terminator):
    prefix = b"\xef\xbb\xbf" if bom else b""
    jsonl = "".join(json.dumps({"prompt": p, "completion": c}) + newline for p, c in pairs)
    out = io.StringIO()
    writer = csv.writer(
        out, lineterminator=terminator, quoting=csv.QUOTE_ALL
    )  # minimal quoting misses \n with a \r terminator
    writer.writerows([("prompt", "completion"), *pairs])
    for suffix, body in ((".jsonl", jsonl), (".csv", out.getvalue())):
        source = load(write(workdir, suffix, prefix + body.encode()))
        assert not isinstance(source, DataError), source
        got = [json.loads(r["messages"]) for r in source.dataset]
        assert [(m[0]["content"], m[1]["content"]) for m in got] == pairs


# -- bombs: bounded memory (an address-space limit) and bounded time, in a child process ------------
BOMBS = {
    "deep.jsonl": lambda: b"[" * 10_000_000 + b"\n",
    "deep.json": lambda: b'{"a":' * 2_000_000,
    "long_line.jsonl": lambda: b'{"text": "' + b"x" * 30_000_000 + b'"}\n',
    "long_cell.csv": lambda: b"text\n" + b"y" * 30_000_000 + b"\n",
    "huge_number.jsonl": lambda: b'{"text": ' + b"9" * 10_000_000 + b"}\n",
    "many_rows.json": lambda: b"[" + b",".join([b'{"text": "a"}'] * 200_000) + b"]",
    "wide.csv": lambda: b",".join(b"c%d" % i for i in range(200_000)) + b"\n" + b"," * 199_999 + b"\n",
    "deep_cell.csv": lambda: b'messages\n"' + b"[" * 5_000_000 + b'"\n',
}
CHILD = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1536 * 2**20, 1536 * 2**20))  # a blow-up fails fast, not the machine
    from lorafit.data.formats import detect_format, normalize_row
    from lorafit.data.readers import read_rows
    for path in sys.argv[1:]:
        n = 0
        for loc, row, problem in read_rows(path):
            n += 1
            fmt = detect_format(row) if row is not None else None
            if fmt:
                normalize_row(row, fmt)
        print(path, n, flush=True)
    # this program's own peak, not the pytest worker's that started it (see peak_rss_bytes)
    from lorafit.runtime import peak_rss_bytes
    print("peak_rss_mib", peak_rss_bytes() // 2**20)
""")


def test_bombs_bounded_memory_and_time(tmp_path):
    files = []
    for name, make in BOMBS.items():
        (tmp_path / name).write_bytes(make())
        files.append(str(tmp_path / name))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    done = subprocess.run([sys.executable, "-c", CHILD, *files], capture_output=True, text=True, timeout=90, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(f in done.stdout for f in files)
    peak = int(done.stdout.split("peak_rss_mib")[1])
    assert peak < 1024, f"reading {len(files)} hostile files peaked at {peak} MiB"


# -- through the CLI: exit 2, every file named with its line, no traceback ----------------------------
def test_data_check_cli_names_every_bad_file(tmp_path, smollm2_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "nasty"
    folder.mkdir()
    (folder / "a_deep.jsonl").write_bytes(b"[" * 100_000 + b"\n")
    (folder / "b_surrogate.jsonl").write_bytes(b'{"text": "a\\ud800b"}\r\n')
    (folder / "c_bigint.json").write_bytes(b'[{"text": ' + b"1" * 5000 + b"}]")
    (folder / "d_cell.csv").write_bytes(b'\xef\xbb\xbfmessages\r\n"' + b"[" * 50_000 + b'"\r\n')
    (folder / "e_random.jsonl").write_bytes(b"\xff\x00\xfe\r")
    pq.write_table(pa.table({"text": pa.array([b"\xff"], pa.binary())}), folder / "f_binary.parquet")
    (folder / "g_broken.parquet").write_bytes(b"PAR1" + os.urandom(64) + b"PAR1")
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        LORAFIT_DATA_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"),
    )
    done = subprocess.run(
        [sys.executable, "-c", "from lorafit.cli import main; main()", "data", "check", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output and "unexpected" not in output, output
    for name, where in [
        ("a_deep.jsonl", ":1"),
        ("b_surrogate.jsonl", ":1"),
        ("c_bigint.json", ":1"),
        ("d_cell.csv", ":2"),
        ("e_random.jsonl", ":1"),
        ("f_binary.parquet", ": row 1"),
        ("g_broken.parquet", ""),
    ]:
        assert f"{folder / name}{where}: " in output, (name, output)
