"""Where records come from: a data file, a directory of them, or a Hugging Face hub dataset ID.

Each source yields raw rows: a parsed value plus the ``FILE:LINE`` it came from. What a row
*means* (which format, whether it is valid) is decided in :mod:`edge_tune.data.formats`.

A problem confined to one row (a broken JSON line, a bad byte on one line, a CSV row with the
wrong number of cells) travels on the row as ``error``, so ``skip_invalid`` can skip it. A
problem with the whole file (a .json syntax error, an unreadable Parquet file) raises at once.

Rows of .jsonl/.csv/.txt files are numbered by file line (``data.csv:7``); rows of .json,
.parquet, .arrow, saved datasets and hub datasets by 1-based record index (``data.json:#3``),
since they have no lines.

Which files of a folder train, validate or are left for ``eval``, and how hub IDs, mixing
weights and ``--columns`` are named, is :mod:`edge_tune.data.layouts`; reading Hugging Face
``datasets`` data is :mod:`edge_tune.data.hf_sources`. ``open_sources`` applies, per source,
``--columns`` (renamed keys; a missing mapped column is that row's error), ``--max-samples``
(the first N rows) and the weight (a seeded share, or repeats).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from edge_tune.data import hf_sources, layouts
from edge_tune.data.layouts import DataSpec, Part
from edge_tune.errors import DataError, UsageError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
            ".tsv": "tsv", ".parquet": "parquet", ".txt": "txt", ".arrow": "arrow"}
# Cells of these CSV columns hold a whole conversation, written as JSON text.
JSON_COLUMNS = ("messages", "conversations")
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
    role: str = "train"  # train | valid | test (layouts.ROLE_WORDS)
    weight: float = 1.0
    read: int = 0  # rows read from the source (after --max-samples), filled while iterating
    used: int = 0  # rows passed on (after the weight)


def open_sources(spec) -> list[Source]:
    """The sources behind ``spec`` (a path or hub spec string, or a :class:`DataSpec`): for
    each source, its parts of ``spec.role`` (train by default; a folder's valid and test files
    are not training data), with ``--columns``, ``--max-samples`` and weights applied. The
    opened sources are also appended to ``spec.opened`` (their counts fill while reading)."""
    data = layouts.data_spec(spec)
    sources = []
    for part in source_parts(data):
        if part.role == data.role:
            source = open_part(part, data)
            sources.append(source)
            data.opened.append(source)
    if not sources:
        raise DataError(f"{data}: no {data.role} data")
    return sources


def source_parts(data: DataSpec) -> list[Part]:
    """Every part of every source of ``data``, with its role (no data read). Raises
    EdgeTuneError for a folder with nothing to train, a missing file, a bad weight."""
    parts: list[Part] = []
    for spec in data.specs:
        path = Path(spec.target)
        if spec.hub:
            parts.append(Part("hub", layouts.hub_label(spec), "train", spec))
        elif path.is_dir() and layouts.is_saved_dataset(path):
            parts.append(Part("saved", str(path), "train", spec, path=path))
        elif path.is_dir():
            parts.extend(layouts.folder_parts(path, spec, list(SUFFIXES)))
        else:
            if spec.split:
                raise UsageError(f"@{spec.split} names a part of a "
                                 f"folder or a hub split; {spec.target} is not a folder",
                                 setting="data", value=spec.text)
            parts.append(Part("file", str(path), "train", spec, path=path))
    return parts


def data_fingerprint(data: DataSpec) -> Optional[str]:
    """What ``--resume`` compares: one data file's sha256 (as before), else a sha256 over every
    local part (its name, role and bytes), the weights, columns and max_samples; None for a
    single hub dataset (its cache is the hub's to keep)."""
    import hashlib

    from edge_tune.fsutil import sha256_file

    parts = source_parts(data)
    if len(parts) == 1 and parts[0].kind == "file" and not data.columns and \
            data.max_samples is None and parts[0].spec.weight == 1.0:
        return sha256_file(parts[0].path) if parts[0].path.is_file() else None
    if all(p.kind == "hub" for p in parts) and len(parts) == 1:
        return None
    h = hashlib.sha256(json.dumps([str(data), data.columns, data.max_samples]).encode())
    for part in parts:
        h.update(f"{part.name}\0{part.role}\0{part.spec.weight}\0".encode())
        if part.path is None:
            continue
        files = [part.path] if part.path.is_file() else sorted(
            f for f in part.path.rglob("*") if f.is_file())
        for f in files:
            h.update(f"{f.name}\0{sha256_file(f)}\0".encode())
    return h.hexdigest()


def open_part(part: Part, data: Optional[DataSpec] = None) -> Source:
    """One part as a :class:`Source`, with ``data``'s columns, max_samples and weight."""
    if part.kind == "hub":
        spec = part.spec
        values = hf_sources.hub_values(spec.target, spec.config, spec.split, part.name)
        source = Source(part.name, _indexed(values, part.name))
    elif part.kind == "saved":
        source = Source(part.name, _indexed(hf_sources.saved_dataset_values(part.path,
                                                                            part.name),
                                            part.name))
    else:
        source = file_source(Path(part.name))
    source.role, source.weight = part.role, part.spec.weight
    data = data or DataSpec([part.spec])
    source.rows = _shaped(source, source.rows, data.columns, data.max_samples,
                          part.spec.weight if part.role == "train" else 1.0,
                          f"{data.seed}:{part.spec.text}")
    return source


def _indexed(values, name: str) -> Iterator[Row]:
    for i, value in enumerate(values, 1):
        yield Row(i, f"{name}:#{i}", value)


def _shaped(source: Source, rows: Iterator[Row], columns: dict, max_samples: Optional[int],
            weight: float, seed: str) -> Iterator[Row]:
    """``source``'s rows with keys renamed, cut to the first ``max_samples``, and weighted:
    the whole part of ``weight`` repeats every row, the rest takes a seeded share of them."""
    import itertools

    if max_samples is not None:
        rows = itertools.islice(rows, max_samples)
    if columns:
        rows = (_renamed(row, columns) for row in rows)

    def counted(rows):
        for row in rows:
            source.read += 1
            yield row

    rows = counted(rows)
    if weight == 1.0:
        for row in rows:
            source.used += 1
            yield row
        return
    import random

    kept = list(rows)
    whole, share = int(weight), weight - int(weight)
    chosen = sorted(random.Random(seed).sample(range(len(kept)), round(len(kept) * share)))
    out = [r for _ in range(whole) for r in kept] + [kept[i] for i in chosen]
    source.used = len(out)
    yield from out


def _renamed(row: Row, columns: dict) -> Row:
    """``row`` with its source columns renamed to edge-tune keys; a missing mapped column (or
    a key it would overwrite) is the row's error."""
    if row.error or not isinstance(row.value, dict):
        return row
    value = dict(row.value)
    for src, dst in columns.items():
        if src not in value:
            have = ", ".join(sorted(map(str, value))[:10]) or "none"
            return Row(row.line, row.where, error=f"{row.where}: missing column {src!r} "
                       f"(mapped by --columns {src}={dst}; found keys: {have})")
        if dst in value and dst not in columns and value[dst] is not None:
            return Row(row.line, row.where, error=f"{row.where}: --columns {src}={dst}: the "
                       f"record already has {dst!r} (map or rename one of them)")
    renamed = {columns.get(k, k): v for k, v in value.items()}
    return Row(row.line, row.where, renamed)


def file_source(path: Path, kind: Optional[str] = None) -> Source:
    """One file, read as ``kind`` ("jsonl", "json", ...) or as its suffix says."""
    if not path.exists():
        raise UsageError(f"{path}: no such data file")
    kind = kind or SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UsageError(f"{path}: unsupported file type '{path.suffix or '(no suffix)'}' "
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
        raise DataError(f"{name}: cannot read ({exc.strerror or exc})") from None


def _read_text(path: Path, name: str) -> str:
    """The whole file as text; a bad byte is fatal here (.json/.csv/.txt have no per-row bytes)."""
    data = _read_bytes(path, name)
    data = data[len(_BOM):] if data.startswith(_BOM) else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, what = _not_utf8(data, exc)
        raise DataError(f"{name}:{line}: {what}") from None


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
        raise DataError(f"{name}:{exc.lineno}: invalid JSON ({exc.msg} at column "
                        f"{exc.colno})") from None
    except RecursionError:
        raise DataError(f"{name}: invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python will convert
        raise DataError(f"{name}: invalid JSON ({_first_line(exc)})") from None
    if not isinstance(value, list):
        raise DataError(f"{name}: expected a JSON array of records at the top level, got "
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
            raise DataError(f"{name}:{reader.line_num}: bad CSV ({exc})") from None
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
        raise UsageError(f"{name}: reading .parquet files needs pyarrow "
                         "(pip install pyarrow)") from None
    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for value in batch.to_pylist():
                n += 1
                yield Row(n, f"{name}:#{n}", value)
    except Exception as exc:  # noqa: BLE001 - pyarrow's own error types, for a corrupt file
        raise DataError(f"{name}: cannot read Parquet file ({_first_line(exc)})") from None


def _arrow_rows(path: Path, name: str) -> Iterator[Row]:
    yield from _indexed(hf_sources.arrow_file_values(path, name), name)


_READERS = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "txt": _txt_rows,
            "tsv": lambda path, name: _csv_rows(path, name, "\t"), "parquet": _parquet_rows,
            "arrow": _arrow_rows}
