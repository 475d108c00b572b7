"""How a data source is named, and which part each file of a folder plays. Pure naming (the
file system is listed, never read); :mod:`edge_tune.data.readers` opens what is named here.

A source spec is ``PATH`` or ``NAME[:CONFIG][@SPLIT]``, optionally ending in ``*W`` (a mixing
weight, a float > 0: 0.5 = a seeded half of the source's records, 2 = each record twice):

- ``chats.jsonl``, ``data/`` (a folder), ``ds/`` (a Hugging Face ``save_to_disk`` folder);
  ``DIR@test`` names one part of a folder or a split of a saved ``DatasetDict``;
- ``HuggingFaceTB/smoltalk:everyday-conversations@train`` (config, split),
  ``HuggingFaceH4/ultrachat_200k@train_sft``: a hub dataset ID (``datasets.load_dataset``'s
  ``path``, ``name`` and ``split``), read from the local Hugging Face cache.

A path that exists is always a path (a file may be called ``a*2.jsonl``).

Parts of a folder, by file name (mlx-lm's documented layout, LORA.md "Data":
``train.jsonl``, ``valid.jsonl``, ``test.jsonl``; Hugging Face ``datasets`` splits are named
the same way, ``train-00000-of-00001.parquet``, ``validation``, ``dev``):

====== ======================================== ===========================================
part   names (a word of the file's stem)         what training does with it
====== ======================================== ===========================================
train  train                                     trains
valid  valid, validation, val, dev               the validation set (unless --val/--val-split)
test   test                                      never trained: left for ``edge-tune eval``
====== ======================================== ===========================================

A folder with none of these names trains on every data file in it (as before); in a folder
that has them, a file with no such name is not used (and said so).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from edge_tune.errors import DataError, UsageError

ROLE_WORDS = {"train": ("train",), "valid": ("valid", "validation", "val", "dev"),
              "test": ("test",)}
# what the output says each part is for
ROLE_SAYS = {"train": "training", "valid": "validation", "test": "left for `edge-tune eval`",
             "unused": "not used (no train/valid/test in its name; this folder has them)"}
# "org/name" (one slash, hub-legal characters), with an optional :CONFIG and @SPLIT
HUB_SPEC = re.compile(r"(?P<name>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<config>[\w.-]+))?"
                      r"(?:@(?P<split>[\w.\-\[\]:%+]+))?")
_WEIGHT = re.compile(r"(?P<target>.+?)\*(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")


@dataclass
class SourceSpec:
    """One ``--data`` value, parsed: ``target`` (a path or hub ID), ``config``, ``split`` (for
    a folder: the part, ``train``/``valid``/``test``, or a saved split's name), ``weight``."""
    text: str
    target: str
    config: Optional[str] = None
    split: Optional[str] = None
    weight: float = 1.0
    hub: bool = False  # a hub dataset ID (not a local path)


@dataclass
class Part:
    """One thing to read: a data file, a ``save_to_disk`` dataset folder, or a hub split.
    ``role``: train | valid | test | unused; ``named``: the role came from the name."""
    kind: str  # "file" | "saved" | "hub"
    name: str  # as messages show it: the path, or NAME[:CONFIG]@SPLIT
    role: str
    spec: SourceSpec
    named: bool = False
    path: Optional[Path] = None


@dataclass
class DataSpec:
    """What ``--data`` (repeatable), ``--columns`` and ``--max-samples`` name together; passed
    as the ``path`` of ``formats.read_records`` (its ``str`` is the name messages use).
    ``role``: which part of the sources is read (train, valid or test). ``opened`` collects
    the :class:`~edge_tune.data.readers.Source` objects read, with their counts."""
    specs: list[SourceSpec]
    columns: dict[str, str] = field(default_factory=dict)
    max_samples: Optional[int] = None
    seed: int = 0
    role: str = "train"
    opened: list = field(default_factory=list)

    def __str__(self) -> str:
        names = " + ".join(s.text for s in self.specs)
        if self.role == "train":
            return names
        return f"{names}@{self.role}" if len(self.specs) == 1 else f"({names})@{self.role}"

    def with_role(self, role: str) -> "DataSpec":
        return DataSpec(self.specs, self.columns, self.max_samples, self.seed, role)


def data_values(data) -> list[str]:
    """``cfg.data`` (one spec string, or a list of them) as a list."""
    if isinstance(data, (list, tuple)):
        return [str(d) for d in data]
    return [str(data)] if data else []


def data_spec(data, columns=None, max_samples: Optional[int] = None,
              seed: int = 0) -> DataSpec:
    """A :class:`DataSpec` from config values: ``data`` a spec or list of specs, ``columns``
    ``"src=dst,..."`` or a mapping. Raises UsageError for a malformed spec or mapping."""
    if isinstance(data, DataSpec):
        return data
    return DataSpec([parse_spec(t) for t in data_values(data)], parse_columns(columns),
                    max_samples, seed)


def parse_spec(text: str) -> SourceSpec:
    """``PATH[*W]`` or ``NAME[:CONFIG][@SPLIT][*W]`` (see the module docstring). Pure but for
    checking whether a path exists. Raises UsageError for a bad weight."""
    text = str(text).strip()
    if not text:
        raise UsageError("empty source", setting="data")
    if Path(text).exists():
        return SourceSpec(text, text)
    target, weight = text, 1.0
    m = _WEIGHT.fullmatch(text)
    if m:
        target, weight = m["target"], float(m["weight"])
        if not weight > 0:
            raise UsageError(f"weight {m['weight']} must be > 0 (0.5 = a seeded "
                             "half of the records, 2 = each record twice)",
                             setting="data", value=text)
    elif "*" in text and not Path(text).exists():
        raise UsageError(f"no such file, and '*{text.rsplit('*', 1)[1]}' is not a "
                         "weight (expected SOURCE*W with W a number > 0, e.g. data.jsonl*0.5)",
                         setting="data", value=text)
    if Path(target).exists():
        return SourceSpec(text, target, weight=weight)
    head, _, split = target.rpartition("@")
    if head and Path(head).is_dir():  # DIR@test: one part of a folder or saved DatasetDict
        return SourceSpec(text, head, split=split, weight=weight)
    hub = HUB_SPEC.fullmatch(target)
    if hub and Path(hub["name"]).suffix.lower() not in _FILE_SUFFIXES and \
            not Path(hub["name"]).parent.exists():
        return SourceSpec(text, hub["name"], hub["config"], hub["split"], weight, hub=True)
    return SourceSpec(text, target, weight=weight)  # a missing path: the reader says so


_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt", ".arrow")


def parse_columns(columns) -> dict[str, str]:
    """``"question=prompt,answer=completion"`` or ``{"question": "prompt"}`` -> {source column:
    edge-tune key}. Raises UsageError naming the bad pair."""
    if not columns:
        return {}
    if isinstance(columns, dict):
        pairs = list(columns.items())
    else:
        pairs = []
        for item in str(columns).split(","):
            if not item.strip():
                continue
            src, sep, dst = item.partition("=")
            if not sep:
                raise UsageError(f"{item.strip()!r} is not SRC=DST (expected "
                                 "source column = edge-tune key, e.g. question=prompt)",
                                 setting="columns", value=columns)
            pairs.append((src, dst))
    out: dict[str, str] = {}
    for src, dst in pairs:
        src, dst = str(src).strip(), str(dst).strip() if isinstance(dst, str) else dst
        if not src or not isinstance(dst, str) or not dst:
            raise UsageError(f"{src!r}={dst!r} needs a source column and a key "
                             "(e.g. question=prompt)", setting="columns")
        if dst in out.values():
            raise UsageError(f"two columns map to {dst!r}", setting="columns")
        out[src] = dst
    return out


def columns_text(columns: dict[str, str]) -> str:
    """The mapping as ``--columns`` takes it: ``question=prompt,answer=completion``."""
    return ",".join(f"{k}={v}" for k, v in columns.items())


def role_of(name: str) -> Optional[str]:
    """The part a file (or split) name plays: ``train.jsonl`` -> train, ``validation`` ->
    valid, ``test-00000-of-00001.parquet`` -> test; None when its stem has no such word or
    words of two parts (``train_test.jsonl``)."""
    stem = name.lower()
    for suffix in _FILE_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[:-len(suffix)]
    words = set(re.split(r"[^a-z]+", stem))
    roles = {role for role, names in ROLE_WORDS.items() if words & set(names)}
    return roles.pop() if len(roles) == 1 else None


def is_saved_dataset(path: Path) -> bool:
    """A ``datasets.Dataset.save_to_disk`` folder: state.json, dataset_info.json, data-*.arrow."""
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def is_saved_dict(path: Path) -> bool:
    """A ``datasets.DatasetDict.save_to_disk`` folder: dataset_dict.json and a folder a split."""
    return (path / "dataset_dict.json").is_file()


def saved_splits(path: Path) -> list[str]:
    """The split names a saved DatasetDict lists. Raises DataError for an unreadable file."""
    where = path / "dataset_dict.json"
    try:
        splits = json.loads(where.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{where}: not a datasets DatasetDict description ({exc}; expected "
                        '{"splits": [...]})') from None
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise DataError(f"{where}: 'splits' must be a list of split names")
    return splits


def folder_parts(path: Path, spec: SourceSpec, suffixes) -> list[Part]:
    """Every part of a folder: its data files (``suffixes``), or a saved DatasetDict's splits,
    each with its role. Raises DataError for a folder with no data, or with valid/test parts
    but nothing to train."""
    if is_saved_dict(path):
        items = [(s, path / s, "saved") for s in saved_splits(path)]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"{path}: no data files in this directory (expected "
                            f"{', '.join(suffixes)} files)")
        items = [(p.name, p, "file") for p in files]
    roles = [role_of(name) for name, _, _ in items]
    named = any(roles)
    order = {"train": 0, "valid": 1, "test": 2, None: 3}  # said and read in this order
    items, roles = zip(*sorted(zip(items, roles), key=lambda x: order[x[1]]))
    parts = [Part(kind, str(p), (role or "unused") if named else "train", spec, bool(role), p)
             for (name, p, kind), role in zip(items, roles)]
    if spec.split:  # DIR@PART: that part (or that split, by its exact name) alone
        want = role_of(spec.split) if spec.split not in [n for n, _, _ in items] else None
        chosen = [p for (name, _, _), p in zip(items, parts)
                  if name == spec.split or (want and p.role == want)]
        if not chosen:
            have = ", ".join(n for n, _, _ in items)
            raise DataError(f"{spec.text}: {path} has no part {spec.split!r} (it has: {have})")
        return [Part(p.kind, p.name, "train", spec, True, p.path) for p in chosen]
    if named and not any(p.role == "train" for p in parts):
        found = ", ".join(f"{Path(p.name).name} ({p.role})" for p in parts)
        raise DataError(f"{path}: nothing to train on: this folder has {found} but no train "
                        f"part (name the training file train{_first_suffix(parts)}, or give a "
                        f"file with --data {path}/FILE)")
    return parts


def _first_suffix(parts: list[Part]) -> str:
    return Path(parts[0].name).suffix if parts and parts[0].kind == "file" else ""


def hub_label(spec: SourceSpec) -> str:
    """``NAME[:CONFIG][@SPLIT]``: a hub source as messages show it (as given; the split is
    ``train`` when none is named)."""
    config = f":{spec.config}" if spec.config else ""
    return f"{spec.target}{config}" + (f"@{spec.split}" if spec.split else "")


def say_parts(parts: list, on_event, other_val: str = "") -> dict[str, list[str]]:
    """One line per part of the data saying what it is for (``DIR/test.jsonl: left for
    `edge-tune eval```), and ``{role: [absolute path or name, ...]}`` for the manifest. With
    ``other_val`` (``--val``/``--val-split``) a folder's valid files are said to be unused and
    listed as such. A single hub split is not named here (its reading line names it)."""
    from edge_tune.events import Log

    files: dict[str, list[str]] = {}
    for part in parts:
        if part.kind == "hub" and len(parts) == 1:
            continue
        role, says = part.role, ROLE_SAYS[part.role]
        if role == "valid" and other_val:
            role, says = "unused", f"not used ({other_val} gives the validation set)"
        elif role == "train" and not part.named and part.kind == "file" and \
                Path(part.spec.target).is_dir():
            says += " (no train/valid/test names in this folder: every data file trains)"
        files.setdefault(role, []).append(
            str(part.path.resolve()) if part.path is not None else part.name)
        if len(parts) == 1 and not part.named and not (
                part.kind == "file" and Path(part.spec.target).is_dir()):
            continue  # one plain file: the reading line that follows names it
        on_event(Log(f"{part.name}: {says}", "warning" if part.role == "unused" else "info"))
    return files
