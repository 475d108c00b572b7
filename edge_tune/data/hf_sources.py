"""Records kept by Hugging Face ``datasets``: ``save_to_disk`` folders, single Arrow files and
hub dataset IDs read offline from the local Hugging Face cache. Each yields plain dicts (one per
record, in order); :mod:`edge_tune.data.readers` numbers them ``NAME:#N``.

- ``Dataset.save_to_disk(DIR)`` writes ``dataset_info.json``, ``state.json`` (its
  ``_data_files`` list) and ``data-00000-of-0000N.arrow`` shards in the Arrow IPC *stream*
  format (https://huggingface.co/docs/datasets/process#save). ``datasets.load_from_disk`` reads
  it when ``datasets`` is installed; pyarrow alone reads the shards otherwise.
- A single ``.arrow`` file: the IPC stream format (what ``datasets`` writes), or the IPC file
  format (Feather v2), read with pyarrow.
- A hub ID (``NAME[:CONFIG][@SPLIT]``): the dataset's snapshot in the hub cache
  (``$HF_HOME/hub/datasets--ORG--NAME``, as ``hf download --repo-type dataset NAME`` leaves
  it) loaded with ``datasets.load_dataset(SNAPSHOT, CONFIG, split=SPLIT)``, which reads
  the README's ``configs`` and the file names' splits offline; else ``datasets``' own cache;
  else (online only) ``load_dataset`` downloads it. Offline and not cached: one line naming the
  command that fetches it.

Heavy imports (pyarrow, datasets, huggingface_hub) happen inside the functions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional

from edge_tune.errors import DataError, NetworkError, UsageError


def _first_line(exc: BaseException) -> str:
    """The exception's first line; with datasets' "Config name is missing." its list of
    configs too (the second line), so the one-line error still says what to name."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "config" in lines[0].lower() and len(lines) > 1 and "available configs" in lines[1]:
        return f"{lines[0]} {lines[1]} (name one as NAME:CONFIG)"
    return lines[0]


def _pyarrow(name: str):
    try:
        import pyarrow as pa  # heavy and optional: only when Arrow data is read
        import pyarrow.ipc  # noqa: F401 - the IPC readers
    except ImportError:
        raise UsageError(f"{name}: reading Arrow data needs pyarrow (pip install pyarrow)") \
            from None
    return pa


def arrow_file_values(path: Path, name: str) -> Iterator[dict]:
    """The records of one Arrow IPC file (stream format first, then file format). Raises
    DataError for a file that is neither."""
    pa = _pyarrow(name)
    try:
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            for batch in batches:
                yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{name}: cannot read Arrow file ({_first_line(exc)}; expected the "
                        "Arrow IPC stream or file format, as datasets writes)") from None


def saved_dataset_values(path: Path, name: str) -> Iterator[dict]:
    """The records of a ``Dataset.save_to_disk`` folder, in order. Raises DataError for a
    folder whose state.json or shards cannot be read."""
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - datasets' own error types, a broken folder
            raise DataError(f"{name}: cannot load this save_to_disk folder "
                            f"({type(exc).__name__}: {_first_line(exc)})") from None
        if isinstance(data, datasets.DatasetDict):
            raise DataError(f"{name}: a DatasetDict inside a split folder (expected a Dataset)")
        yield from data
        return
    state = path / "state.json"
    try:
        files = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))
                 ["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{state}: not a datasets state file ({exc}; expected "
                        '{"_data_files": [{"filename": ...}]})') from None
    for shard in files:
        yield from arrow_file_values(path / shard, f"{name}/{shard}")


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cached_snapshot(repo_id: str) -> Optional[Path]:
    """The dataset's snapshot folder in the local hub cache (refs/main), or None."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends: not cached
        return None


def hub_cache_dir() -> str:
    """Where the hub cache is, as the not-cached message names it."""
    try:
        from huggingface_hub import constants
        where = str(constants.HF_HUB_CACHE)
    except ImportError:
        where = os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    home = os.path.expanduser("~")
    return "~" + where[len(home):] if where.startswith(home + os.sep) else where


def fetch_hint(repo_id: str) -> str:
    """The command that puts a dataset into the hub cache: ``hf download`` (huggingface_hub
    1.0 and later), ``huggingface-cli download`` before."""
    from importlib import metadata

    try:
        old = int(metadata.version("huggingface_hub").split(".")[0]) < 1
    except (metadata.PackageNotFoundError, ValueError):
        old = False
    cli = "huggingface-cli" if old else "hf"
    return f"`{cli} download --repo-type dataset {repo_id}`"


def _config(config: Optional[str]) -> dict:
    return {"name": config} if config else {}


def hub_values(repo_id: str, config: Optional[str], split: Optional[str],
               label: str) -> Iterator[dict]:
    """The records of a hub dataset's split (``train`` when not given), read from the local
    cache. Raises DataError (exit 2) naming what to fetch when it is not cached and the hub
    is off (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``), NetworkError (exit 3) when it is not
    cached and the download fails, DataError for a config or split the dataset lacks."""
    try:
        import datasets
    except ImportError:
        raise UsageError(f"{label}: no such file or directory; loading it as a Hugging Face hub "
                         "dataset needs the datasets package (pip install datasets)") from None
    split = split or "train"
    snapshot = cached_snapshot(repo_id)
    not_cached = (f"{repo_id}: not in the Hugging Face cache ({hub_cache_dir()}) and offline; "
                  f"fetch it once with {fetch_hint(repo_id)}")
    if snapshot is not None:
        try:
            data = datasets.load_dataset(str(snapshot), **_config(config), split=split)
        except Exception as exc:  # noqa: BLE001 - a config or split the dataset lacks, ...
            raise DataError(f"{label}: cannot load it from the Hugging Face cache ({snapshot}): "
                            f"{_first_line(exc)}") from None
    else:
        try:  # datasets' own cache (a set loaded before), or online a download
            data = datasets.load_dataset(repo_id, **_config(config), split=split)
        except Exception as exc:  # noqa: BLE001 - network, auth, missing split: the user's
            if _offline():
                raise DataError(not_cached) from None
            raise NetworkError(f"{label}: not in the Hugging Face cache ({hub_cache_dir()}) and "
                               f"the hub could not load it ({type(exc).__name__}: "
                               f"{_first_line(exc)}); fetch it once with "
                               f"{fetch_hint(repo_id)}") from None
    yield from data
