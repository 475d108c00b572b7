"""Where records come from: a data file, a directory of them, or a Hugging Face hub dataset ID.

Each source yields raw rows: a parsed value plus the ``FILE:LINE`` it came from. What a row
*means* (which format, whether it is valid) is decided in :mod:`edge_tune.data.formats`.

A problem confined to one row (a broken JSON line, a bad byte on one line, a CSV row with the
wrong number of cells) travels on the row as ``error``, so ``skip_invalid`` can skip it. A
problem with the whole file (a .json syntax error, an unreadable Parquet file) raises at once.

Rows of .jsonl/.csv/.txt files are numbered by file line (``data.csv:7``); rows of .json,
.parquet and hub datasets by 1-based record index (``data.json:#3``), since they have no lines.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from edge_tune.errors import EdgeTuneError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
            ".tsv": "tsv", ".parquet": "parquet", ".txt": "txt"}
# Cells of these CSV columns hold a whole conversation, written as JSON text.
JSON_COLUMNS = ("messages", "conversations")
# "org/name" (one slash, hub-legal characters): tried on the hub only when no such path exists.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_BOM = b"\xef\xbb\xbf"  # Windows editors and Excel put it in front of UTF-8 text


@dataclass
class Row:
    line: int  # 1-based file line, or 1-based record index (see the module docstring)
    where: str  # "FILE:LINE" or "FILE:#N": the prefix of every message about this row
    value: object = None
    error: str = ""  # the full one-line message when the row itself could not be read


@dataclass
class Source:
    name: str  # the path or hub ID, as messages show it
    rows: Iterator[Row]  # read lazily: file-level errors surface while iterating


def open_sources(spec) -> list[Source]:
    """The sources behind ``spec``: one file, every data file of a directory, or a hub ID."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in SUFFIXES)
        if not files:
            raise EdgeTuneError(f"{path}: no data files in this directory (expected "
                                f"{_suffix_list()} files)")
        return [file_source(p) for p in files]
    if not path.exists() and HUB_ID.fullmatch(str(spec)) and path.suffix.lower() not in SUFFIXES:
        return [Source(str(spec), _hub_rows(str(spec)))]
    return [file_source(path)]


def file_source(path: Path, kind: Optional[str] = None) -> Source:
    """One file, read as ``kind`` ("jsonl", "json", ...) or as its suffix says."""
    if not path.exists():
        raise EdgeTuneError(f"{path}: no such data file")
    kind = kind or SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise EdgeTuneError(f"{path}: unsupported file type '{path.suffix or '(no suffix)'}' "
                            f"(expected {_suffix_list()})")
    # A zero-byte file is an empty dataset in every container (pyarrow would call it corrupt).
    rows = iter(()) if path.stat().st_size == 0 else _READERS[kind](path, str(path))
    return Source(str(path), rows)


def json_kind(value) -> str:
    """A value's type as JSON calls it: what users wrote, not Python's name for it."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


_JSON_KINDS = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


def _suffix_list() -> str:
    return ", ".join(SUFFIXES)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _loads(text: str, where: str) -> tuple[object, str]:
    """(value, "") or (None, one-line error). Never raises: bad JSON is a property of a row."""
    try:
        return json.loads(text), ""
    except json.JSONDecodeError as exc:
        return None, f"{where}: invalid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return None, f"{where}: invalid JSON (nested too deeply)"
    except ValueError as exc:  # e.g. an integer with more digits than Python will convert
        return None, f"{where}: invalid JSON ({_first_line(exc)})"


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> tuple[int, str]:
    """The 1-based line of the bad byte, and what to say about it."""
    line = data.count(b"\n", 0, exc.start) + 1
    col = exc.start - data.rfind(b"\n", 0, exc.start)
    return line, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at column {col}; save the file " \
                 "as UTF-8)"


def _read_bytes(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise EdgeTuneError(f"{name}: cannot read ({exc.strerror or exc})") from None


def _read_text(path: Path, name: str) -> str:
    """The whole file as text; a bad byte is fatal here (.json/.csv/.txt have no per-row bytes)."""
    data = _read_bytes(path, name)
    data = data[len(_BOM):] if data.startswith(_BOM) else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, what = _not_utf8(data, exc)
        raise EdgeTuneError(f"{name}:{line}: {what}") from None


def _jsonl_rows(path: Path, name: str) -> Iterator[Row]:
    # Bytes, line by line: a bad byte or bad JSON spoils only its own line.
    for n, raw in enumerate(_read_bytes(path, name).split(b"\n"), 1):
        where = f"{name}:{n}"
        raw = raw[len(_BOM):] if n == 1 and raw.startswith(_BOM) else raw
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Row(n, where, error=f"{where}: {_not_utf8(raw, exc)[1]}")
            continue
        if line.strip():  # blank lines (a trailing newline, spacing) are not records
            value, error = _loads(line, where)
            yield Row(n, where, value, error)


def _json_rows(path: Path, name: str) -> Iterator[Row]:
    text = _read_text(path, name)
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _jsonl_rows(path, name)  # JSON Lines saved as .json: common, and harmless
            return
        raise EdgeTuneError(f"{name}:{exc.lineno}: invalid JSON ({exc.msg} at column "
                            f"{exc.colno})") from None
    except RecursionError:
        raise EdgeTuneError(f"{name}: invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python will convert
        raise EdgeTuneError(f"{name}: invalid JSON ({_first_line(exc)})") from None
    if not isinstance(value, list):
        raise EdgeTuneError(f"{name}: expected a JSON array of records at the top level, got "
                            f"{json_kind(value)} (or save one record per line as .jsonl)")
    for i, item in enumerate(value, 1):
        yield Row(i, f"{name}:#{i}", item)


def _csv_rows(path: Path, name: str, delimiter: str = ",") -> Iterator[Row]:
    text = _read_text(path, name)
    # Long texts (a chapter per cell) exceed csv's 128 KiB default; 2**31-1 fits any C long.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: Optional[list[str]] = None
    while True:
        start = reader.line_num + 1  # a quoted cell may span lines: report where the row starts
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise EdgeTuneError(f"{name}:{reader.line_num}: bad CSV ({exc})") from None
        if not any(c.strip() for c in cells):
            continue
        if header is None:
            header = [c.strip() for c in cells]
            continue
        where = f"{name}:{start}"
        if len(cells) != len(header):
            yield Row(start, where, error=f"{where}: expected {len(header)} cells (header: "
                                          f"{', '.join(header)}), got {len(cells)}")
            continue
        yield _csv_row(dict(zip(header, cells)), start, where)


def _csv_row(record: dict, line: int, where: str) -> Row:
    for col in JSON_COLUMNS:
        if isinstance(record.get(col), str):
            record[col], error = _loads(record[col], where)
            if error:
                return Row(line, where, error=error.replace(": invalid JSON",
                                                            f": invalid JSON in column '{col}'", 1))
    return Row(line, where, record)


def _txt_rows(path: Path, name: str) -> Iterator[Row]:
    # Prose: one record per blank-line-separated block, numbered by the block's first line.
    block: list[str] = []
    start = 0
    for n, line in enumerate(_read_text(path, name).split("\n") + [""], 1):
        if line.strip():
            start = start if block else n
            block.append(line.rstrip("\r"))
        elif block:
            yield Row(start, f"{name}:{start}", {"text": "\n".join(block)})
            block = []


def _parquet_rows(path: Path, name: str) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq  # heavy and optional: only when a .parquet file is read
    except ImportError:
        raise EdgeTuneError(f"{name}: reading .parquet files needs pyarrow "
                            "(pip install pyarrow)") from None
    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for value in batch.to_pylist():
                n += 1
                yield Row(n, f"{name}:#{n}", value)
    except Exception as exc:  # noqa: BLE001 - pyarrow's own error types, for a corrupt file
        raise EdgeTuneError(f"{name}: cannot read Parquet file ({_first_line(exc)})") from None


def _hub_rows(name: str) -> Iterator[Row]:
    try:
        import datasets  # heavy and optional: only for a hub ID
    except ImportError:
        raise EdgeTuneError(f"{name}: no such file or directory; loading it as a Hugging Face "
                            "hub dataset needs the datasets package (pip install datasets)") \
            from None
    try:
        data = datasets.load_dataset(name, split="train")
    except Exception as exc:  # noqa: BLE001 - network, auth, missing split: all the user's to fix
        raise EdgeTuneError(f"{name}: no such file or directory, and the hub could not load it "
                            f"({type(exc).__name__}: {_first_line(exc)})") from None
    for i, value in enumerate(data, 1):
        yield Row(i, f"{name}:#{i}", value)


_READERS = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "txt": _txt_rows,
            "tsv": lambda path, name: _csv_rows(path, name, "\t"), "parquet": _parquet_rows}
