"""Small filesystem helpers: cache location, hashing, and all-or-nothing writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def cache_dir() -> Path:
    """Where edge-tune keeps models and dequantized copies (``EDGE_TUNE_CACHE`` overrides)."""
    env = os.environ.get("EDGE_TUNE_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("edge-tune", appauthor=False))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


TEMP_SUFFIX = ".tmp"
# Temp names carry the writing process's id (``.NAME.<pid>.<random>.tmp``): a leftover of a
# process that was killed (kill -9, a power cut) is then recognisable, and
# :func:`sweep_leftovers` removes it once that process is gone.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def temp_prefix(name: str) -> str:
    """The prefix of a temp sibling for ``name`` made by this process (for ``mkdtemp``)."""
    return f".{name}.{os.getpid()}."


def make_temp_dir(final: Path) -> Path:
    """A new hidden temp folder beside ``final``, named so :func:`sweep_leftovers` can tell
    when its owner is gone."""
    return Path(tempfile.mkdtemp(prefix=temp_prefix(Path(final).name), suffix=TEMP_SUFFIX,
                                 dir=Path(final).parent))


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``final`` only if the block succeeds.

    An interrupted or failed write leaves ``final`` untouched (or absent) and no temp file
    (a SIGKILL leaves the temp folder, which :func:`sweep_leftovers` removes later).
    Works for files and directories: an old directory is renamed away before the new one is
    renamed in, so at every moment one complete copy is at ``final`` or beside it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(final)
    target = tmp / final.name
    try:
        yield target
        if final.is_dir() and not final.is_symlink():
            os.replace(final, tmp / ".old")
        os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_tree(path: Path) -> None:
    """Remove a directory so that it is gone at once: renamed to a temp name first, then
    deleted (a kill mid-delete leaves only a temp folder that :func:`sweep_leftovers` knows,
    never a half-empty ``path``)."""
    import secrets

    path = Path(path)
    if not path.is_dir():
        return
    # a sibling name, not a new folder: a rename needs no free space on a full disk
    gone = path.with_name(temp_prefix(path.name) + secrets.token_hex(4) + TEMP_SUFFIX)
    try:
        os.replace(path, gone)
    except OSError:
        gone = path
    shutil.rmtree(gone, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a file: its size); 0 when it is gone."""
    path = Path(path)
    try:
        if not path.is_dir():
            return path.stat().st_size
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    except OSError:
        return 0


LEGACY_AGE = 3600.0  # seconds: a pid-less temp untouched this long is no live write's


def sweep_leftovers(folder: Path, legacy: tuple[str, ...] = (),
                    legacy_age: float = LEGACY_AGE) -> list[tuple[Path, int]]:
    """Remove the temp folders and files edge-tune processes that no longer run left in
    ``folder`` (``.NAME.<pid>.<random>.tmp``, see :func:`temp_prefix`); returns (path,
    bytes) of each removed. A temp whose process still runs is kept. ``legacy``: NAMEs whose
    temps from versions without the pid (``.NAME.<8 random>`` and ``.NAME.<8 random>.tmp``)
    are removed too once untouched for ``legacy_age`` seconds."""
    import time

    folder = Path(folder)
    removed: list[tuple[Path, int]] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    old = re.compile(r"^\.(%s)\.[a-z0-9_]{8}(\.tmp)?$" % "|".join(map(re.escape, legacy))) \
        if legacy else None
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m and _alive(int(m["pid"])):
            continue
        if not m:
            try:
                stale = old is not None and old.match(entry.name) is not None and \
                    time.time() - entry.lstat().st_mtime > legacy_age
            except OSError:
                stale = False
            if not stale:
                continue
        size = tree_bytes(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        if not entry.exists():
            removed.append((entry, size))
    return removed


def leftovers_line(removed: list[tuple[Path, int]]) -> str:
    """One line saying what :func:`sweep_leftovers` removed."""
    total = sum(size for _, size in removed)
    names = ", ".join(p.name for p, _ in removed[:3]) + (" ..." if len(removed) > 3 else "")
    return (f"removed {len(removed)} leftover(s) of killed edge-tune processes in "
            f"{removed[0][0].parent} ({total / 2**20:.1f} MiB): {names}")


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is "no space left on device" (or a quota), however a library wraps it
    (OSError ENOSPC/EDQUOT; safetensors' and torch's own errors only say it in words; numpy's
    short write "2048 requested and 648 written" has no errno at all)."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "StorageFull" in text or \
                "Disk quota exceeded" in text:
            return True
        # numpy's tofile (gguf-py's writer) reports a short fwrite without an errno
        if isinstance(exc, OSError) and exc.errno is None and _SHORT_WRITE.search(text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem of ``path`` (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def require_free(path: Path, need: int, what: str) -> None:
    """Raise :class:`~edge_tune.errors.DiskFull` (exit 2) when the filesystem of ``path`` has
    less than ``need`` bytes (plus 16 MiB of slack) free; ``what``: what will be written."""
    from edge_tune.errors import DiskFull

    free = free_bytes(path)
    if free < need + (16 << 20):
        raise DiskFull(f"{path}: not enough free disk space for {what}: needs about "
                       f"{mib(need + (16 << 20))}, {mib(free)} free (free some space or write "
                       "elsewhere)")


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 10 * 2**20 else f"{n / 2**20:.0f} MiB"


@contextlib.contextmanager
def disk_full_says(path: Path, kept: "str | Callable[[], str]") -> Iterator[None]:
    """Turn "no space left on device" inside the block into one line (DiskFull, exit 2)
    naming ``path`` (what was being written), the free space, and ``kept`` (what is safe and
    how to go on; a callable is asked only when the disk is full)."""
    from edge_tune.errors import DiskFull

    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:  # noqa: BLE001 -- only ENOSPC is translated
        if not is_disk_full(exc):
            raise
        where = getattr(exc, "filename", None) or path
        said = kept() if callable(kept) else kept
        raise DiskFull(f"{where}: no space left on device ({mib(free_bytes(Path(path)))} "
                       f"free); {said}") from None


def check_writable(path: Path, setting: str, folder: bool) -> None:
    """Refuse an output that cannot be written, before any work: a ``folder`` output that is an
    existing file, a file output that is an existing folder, a parent that is a file, or a
    place this user cannot create files in (``/proc``, a read-only mount). Creates nothing.
    Raises UsageError naming ``setting`` (the command's parameter) and ``path``."""
    from edge_tune.errors import UsageError

    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UsageError("exists and is not a directory; expected a folder to write into",
                         setting=setting, value=path)
    if not folder and path.is_dir():
        raise UsageError("is a folder; expected a file name to write", setting=setting,
                         value=path)
    existing = path.absolute() if folder else path.absolute().parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the folders the write would create start here
    if not existing.is_dir():
        raise UsageError(f"{existing} is a file, not a folder; expected a path inside a "
                         "folder", setting=setting, value=path)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=temp_prefix("check"), dir=existing))
    except OSError as exc:
        raise UsageError(f"cannot write into {existing} ({exc.strerror or exc}); choose "
                         "another place", setting=setting, value=path) from None


@contextlib.contextmanager
def write_errors_say(kept: str) -> Iterator[None]:
    """Turn an OSError that names a file (permission denied, a file where a folder should be,
    a vanished folder) inside the block into one line (UsageError, exit 2) naming that file
    and ``kept`` (what is safe); no space left is :func:`disk_full_says`'s."""
    from edge_tune.errors import UsageError

    try:
        yield
    except OSError as exc:
        if is_disk_full(exc) or not getattr(exc, "filename", None):
            raise
        raise UsageError(f"{exc.filename}: {exc.strerror or exc}; {kept}") from None


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
