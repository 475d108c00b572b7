"""``edge-tune bundle``: one folder (or .tar.gz) that carries a base and its adapters to an
edge box, where ``./install.sh`` (offline, from the bundle's own wheels; no torch) is enough
to serve them.

Layout::

    OUT/
      bundle.json          format, models, and the sha256 of every other file
      base/<base>.gguf     the base model llama.cpp loads (or a merged model, --merged)
      adapters/<name>.gguf one GGUF LoRA per run
      manifests/<name>.json the run's manifest (data, hyperparameters, versions)
      chat_template.jinja  the chat template the base is served with (--chat-template, else
                           the base GGUF's own)
      templates/<name>.jinja an adapter's chat template where it differs (its run's)
      serve.sh             launcher: edge-tune serve --bundle <this folder> "$@"
      install.sh           offline install of wheels/ into .venv (pip --no-index)
      wheels/              edge-tune's wheel, llama-cpp-python's as built here, and their
                           dependencies, for a box of this platform (NOTES.txt: what is not)
      README.md            what is inside and how to run it

Planning (:func:`plan_bundle`) is pure; :func:`write_bundle` does the copying, atomically
(nothing is left at OUT if it fails); :func:`load_bundle` verifies every checksum before
anything is loaded, so a damaged or edited bundle fails with one line instead of serving
something else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from edge_tune.errors import DataError, UsageError
from edge_tune.events import Done, EventSink, Log, Progress, ignore

BUNDLE_FILE = "bundle.json"
FORMAT = "edge-tune-bundle/1"


@dataclass
class Entry:
    """One file to copy into the bundle."""

    src: Path
    dest: str  # path inside the bundle, POSIX


@dataclass
class BundlePlan:
    base: Entry
    adapters: dict[str, Entry]  # model name -> adapter GGUF
    manifests: dict[str, dict] = field(default_factory=dict)
    chat_template: str | None = None
    merged: str | None = None  # the run merged into the base, with --merged
    templates: dict[str, str] = field(default_factory=dict)  # adapter -> its own template

    @property
    def entries(self) -> list[Entry]:
        return [self.base, *self.adapters.values()]


def default_name(run: Path) -> str:
    """A model name from a run directory or adapter file name. Pure."""
    stem = run.stem if run.suffix == ".gguf" else run.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._") or "adapter"
    return "adapter" if name == "base" else name[:64]


def split_run_arg(arg: str) -> tuple[str | None, str]:
    """``NAME=RUN`` or ``RUN`` -> (name or None, run). Pure."""
    name, sep, path = arg.partition("=")
    if sep and name and "/" not in name:
        return name, path
    return None, arg


def plan_bundle(base: Path, adapters: list[tuple[str, Path, dict | None]],
                chat_template: str | None = None, merged: str | None = None,
                templates: dict[str, str] | None = None) -> BundlePlan:
    """What goes where: ``adapters`` is [(name, adapter .gguf, run manifest or None)];
    ``chat_template`` is the base's, ``templates`` each adapter's (those equal to the base's
    are not stored twice). Pure."""
    from edge_tune.server import check_model_name

    seen: set[str] = set()
    entries: dict[str, Entry] = {}
    manifests: dict[str, dict] = {}
    for name, path, man in adapters:
        check_model_name(name, f"bundle: {path}")
        if name in seen:
            raise UsageError(f"bundle: two runs would both be named {name!r}; name them "
                             "with NAME=RUN")
        seen.add(name)
        entries[name] = Entry(Path(path), f"adapters/{name}.gguf")
        if man is not None:
            manifests[name] = man
    own = {name: text for name, text in (templates or {}).items()
           if name in entries and text != chat_template}
    return BundlePlan(Entry(Path(base), f"base/{Path(base).name}"), entries, manifests,
                      chat_template, merged, own)


def index(plan: BundlePlan, checksums: dict[str, str], version: str) -> dict:
    """The bundle.json content. Pure."""
    return {
        "format": FORMAT,
        "created_by": f"edge-tune {version}",
        "base": plan.base.dest,
        "merged": plan.merged,
        "chat_template": "chat_template.jinja" if plan.chat_template else None,
        "adapters": {name: {"file": e.dest,
                            "manifest": f"manifests/{name}.json" if name in plan.manifests
                            else None,
                            "chat_template": f"templates/{name}.jinja" if name in plan.templates
                            else None}
                     for name, e in plan.adapters.items()},
        "files": dict(sorted(checksums.items())),
    }


def launcher_script() -> str:
    return ("#!/bin/sh\n"
            "# Serve this bundle over an OpenAI-compatible API: with the edge-tune that\n"
            "# ./install.sh installed (.venv here, or the folder it was given, kept in\n"
            "# .venv-path), else the one on PATH.\n"
            "# Extra flags pass through, e.g. ./serve.sh --port 9000 --api-key KEY\n"
            'here="$(dirname "$0")"\n'
            'venv="$here/.venv"\n'
            '[ -f "$here/.venv-path" ] && venv="$(cat "$here/.venv-path")"\n'
            'if [ -x "$venv/bin/edge-tune" ]; then\n'
            '    exec "$venv/bin/edge-tune" serve --bundle "$here" "$@"\n'
            "fi\n"
            'exec edge-tune serve --bundle "$here" "$@"\n')


def readme(plan: BundlePlan, wheel_notes: list[str] | None = None) -> str:
    """The bundle's README.md; ``wheel_notes``: None when it carries no wheels, else what is
    missing from them (empty: nothing)."""
    names = ", ".join(["base", *plan.adapters]) if plan.adapters else "base"
    first = next(iter(plan.adapters), None)
    lines = [
        "# edge-tune bundle", "",
        f"Base model: `{plan.base.dest}`" + (f" (adapter `{plan.merged}` merged in)"
                                             if plan.merged else ""),
        f"Models served: {names}", "",
        "## Run it", "",
        "```sh",
        *(["./install.sh                       # offline: wheels/ into .venv (no torch)"]
          if wheel_notes is not None else
          ['pip install "edge-tune[run]"      # llama.cpp + a small web stack; no torch']),
        "./serve.sh                         # OpenAI-compatible API on http://127.0.0.1:8000/v1",
        f"{'.venv/bin/' if wheel_notes is not None else ''}edge-tune chat --bundle . "
        f"--adapter {first or 'base'} --prompt 'Hello'",
        "```", "",
        *([] if wheel_notes is None else
          ["`wheels/` holds edge-tune and everything its `[run]` extra needs, built for the "
           "machine that made the bundle (same OS, CPU architecture and Python version; "
           "llama-cpp-python is compiled for that CPU). `install.sh` needs no network. "
           "`./install.sh /opt/edge-tune` installs into that folder instead; `serve.sh` "
           "then runs the edge-tune there (the path is kept in `.venv-path`).",
           *([f"Missing (see {WHEELS_NOTE}): " + "; ".join(wheel_notes)] if wheel_notes
             else []), ""]),
        "Clients pick an adapter with the OpenAI `model` field (`base` = no adapter).",
        "Every file's sha256 is listed in `bundle.json` and checked before anything loads;",
        "`manifests/` holds each run's training record (data, hyperparameters, versions).", "",
    ]
    return "\n".join(lines)


# --- writing -----------------------------------------------------------------------------------

def check_output(out: Path) -> None:
    """Refuse an output path that cannot be written (``-o /proc/x``, a read-only folder)
    before any work, in one line; creates nothing. Raises :class:`EdgeTuneError`."""
    import os
    import tempfile

    out = Path(out)
    if not out.name or out.name in (".", ".."):
        raise UsageError(f"-o {out}: expected a bundle folder or .tar.gz name")
    existing = out.absolute().parent
    while not existing.exists():  # the folders atomic_path would create start here
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, os.strerror(20))
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.", dir=existing))
    except OSError as exc:
        raise UsageError(f"-o {out}: cannot write into {existing} ({exc.strerror or exc}); "
                         "choose another output") from None


def write_bundle(plan: BundlePlan, out: Path, on_event: EventSink = ignore,
                 wheels: bool = True) -> Path:
    """Copy everything into ``out`` (a folder, or a .tar.gz when the name ends so); with
    ``wheels``, also ``wheels/`` (:func:`build_wheelhouse`: what an edge box of this platform
    installs offline) and ``install.sh``, which installs them into a virtual environment."""
    import shutil
    import tarfile
    import tempfile

    from edge_tune import __version__
    from edge_tune.fsutil import (TEMP_SUFFIX, atomic_path, leftovers_line, sha256_file,
                                  sweep_leftovers, temp_prefix)

    out = Path(out)
    check_output(out)
    as_tar = out.name.endswith((".tar.gz", ".tgz"))
    if out.exists() and not as_tar and (not out.is_dir() or any(out.iterdir())) \
            and not (out / BUNDLE_FILE).is_file():
        raise UsageError(f"-o {out}: exists and is not an edge-tune bundle; choose another "
                         "output")
    total = sum(e.src.stat().st_size for e in plan.entries)
    done = 0
    parent = out.parent if out.parent.exists() else None
    if parent is not None:  # a killed bundle's copy (up to the base's size) goes first
        removed = sweep_leftovers(parent)
        if removed:
            on_event(Log(leftovers_line(removed)))
    with tempfile.TemporaryDirectory(prefix=temp_prefix(out.name), suffix=TEMP_SUFFIX,
                                     dir=parent) as work:
        root = Path(work) / (out.name.split(".tar")[0].removesuffix(".tgz") if as_tar
                             else out.name)
        for entry in plan.entries:
            dest = root / entry.dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            on_event(Progress("bundle", done, total, "B", f"copying {entry.src.name}"))
            shutil.copyfile(entry.src, dest)
            done += entry.src.stat().st_size
        on_event(Progress("bundle", total, total, "B", "copied"))
        for name, man in plan.manifests.items():
            (root / "manifests").mkdir(exist_ok=True)
            (root / f"manifests/{name}.json").write_text(json.dumps(man, indent=2) + "\n")
        if plan.chat_template:
            (root / "chat_template.jinja").write_text(plan.chat_template, encoding="utf-8")
        for name, text in plan.templates.items():
            (root / "templates").mkdir(exist_ok=True)
            (root / f"templates/{name}.jinja").write_text(text, encoding="utf-8")
        (root / "serve.sh").write_text(launcher_script())
        (root / "serve.sh").chmod(0o755)
        notes = None
        if wheels:
            (root / WHEELS_DIR).mkdir()
            notes = build_wheelhouse(root / WHEELS_DIR, on_event)
            if notes:
                (root / WHEELS_NOTE).write_text("\n".join(notes) + "\n")
                for note in notes:
                    on_event(Log(f"bundle wheels: {note}", "warning"))
            (root / INSTALL_SCRIPT).write_text(install_script())
            (root / INSTALL_SCRIPT).chmod(0o755)
        (root / "README.md").write_text(readme(plan, notes))
        sums = {p.relative_to(root).as_posix(): sha256_file(p)
                for p in sorted(root.rglob("*")) if p.is_file()}
        (root / BUNDLE_FILE).write_text(json.dumps(index(plan, sums, __version__), indent=2)
                                        + "\n")
        with atomic_path(out) as tmp:
            if as_tar:
                with tarfile.open(tmp, "w:gz") as tar:
                    tar.add(root, arcname=root.name)
            else:
                shutil.move(str(root), tmp)
    on_event(Log(f"wrote {out} ({', '.join(['base', *plan.adapters])}; "
                 f"{total / 2**20:.0f} MiB of models)"))
    on_event(Done("bundle", {"path": str(out)}))
    return out


# --- loading -----------------------------------------------------------------------------------

def _extract(archive: Path) -> Path:
    """Unpack a .tar.gz bundle into a private temporary folder, removed at exit."""
    import atexit
    import shutil
    import tarfile
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="edge-tune-bundle-"))
    atexit.register(shutil.rmtree, work, True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(work, filter="data")  # no absolute paths, links out, or devices
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot unpack ({exc})",
                        setting="bundle", value=archive) from None
    found = sorted(work.glob(f"*/{BUNDLE_FILE}")) or sorted(work.glob(BUNDLE_FILE))
    if not found:
        raise DataError(f"no {BUNDLE_FILE} inside; not an edge-tune "
                        "bundle", setting="bundle", value=archive)
    return found[0].parent


def read_index(folder: Path) -> dict:
    path = folder / BUNDLE_FILE
    if not path.is_file():
        raise DataError(f"no {BUNDLE_FILE}; not an edge-tune bundle "
                        "(make one with `edge-tune bundle RUN -o OUT`)",
                        setting="bundle", value=folder)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    found = data.get("format") if isinstance(data, dict) else None
    if found != FORMAT:
        raise DataError(f"{path}: 'format' is {found!r}; expected {FORMAT!r}")
    return data


def verify(folder: Path, data: dict) -> None:
    """Every listed file exists and has its recorded sha256; the models are listed."""
    from edge_tune.fsutil import sha256_file

    files = data.get("files") or {}
    adapters = (data.get("adapters") or {}).values()
    needed = [data.get("base")] + [a.get("file") for a in adapters] + \
        [rel for rel in [data.get("chat_template"), *(a.get("chat_template") for a in adapters)]
         if rel]
    for rel in needed:
        if rel not in files:
            raise DataError(f"{folder / BUNDLE_FILE}: {rel!r} has no checksum; the bundle "
                            "index was edited")
    for rel, want in files.items():
        path = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise DataError(f"{folder / BUNDLE_FILE}: file {rel!r} points outside the "
                            "bundle")
        if not path.is_file():
            raise DataError(f"{path}: missing from the bundle; copy the bundle again")
        got = sha256_file(path)
        if got != want:
            raise DataError(f"{path}: sha256 {got[:12]}… does not match bundle.json "
                            f"({want[:12]}…); the file is damaged or was changed — copy "
                            "the bundle again")


def load_bundle(path: Path, on_event: EventSink = ignore):
    """A verified bundle as a :class:`edge_tune.server.plan.ServePlan`."""
    from edge_tune.server.plan import BASE, ServePlan, ServedModel

    path = Path(path)
    if not path.exists():
        raise UsageError("no such file or directory",
                         setting="bundle", value=path)
    folder = _extract(path) if path.is_file() else path
    data = read_index(folder)
    verify(folder, data)
    on_event(Log(f"{path}: {len(data['files'])} files verified (sha256)", "debug"))
    plan = ServePlan(folder / data["base"], base_sha256=data["files"][data["base"]])
    base = plan.models[BASE]
    # The base's template: chat_template.jinja (older bundles hold the GGUF's own there).
    base_template = folder / (data.get("chat_template") or "chat_template.jinja")
    if base_template.is_file() and base_template.relative_to(folder).as_posix() in data["files"]:
        base.chat_template = base_template.read_text(encoding="utf-8")
    for name, a in data.get("adapters", {}).items():
        man = _read_manifest(folder, a.get("manifest"))
        plan.models[name] = ServedModel(
            adapter=folder / a["file"],
            # checksummed with every other listed file
            chat_template=(folder / a["chat_template"]).read_text(encoding="utf-8")
            if a.get("chat_template") else None,
            stop_tokens=tuple(man.stop_tokens or ()),
            system_mode=man.hyperparameters.system_mode or "keep",
            system=man.data.system or None)
    if data.get("merged"):  # the merged model answers as its run does
        man = _read_manifest(folder, f"manifests/{data['merged']}.json")
        base.system_mode = man.hyperparameters.system_mode or "keep"
        base.system = man.data.system or None
        base.stop_tokens = tuple(man.stop_tokens or ())
    return plan


def _read_manifest(folder: Path, rel: str | None):
    """A bundled run's manifest (an empty one when the bundle holds none)."""
    from edge_tune.manifest import Manifest

    if not rel or not (folder / rel).is_file():
        return Manifest()
    return Manifest.load(folder / rel)


# --- wheels: what an edge box installs offline ---------------------------------------------------

WHEELS_DIR = "wheels"
INSTALL_SCRIPT = "install.sh"
WHEELS_NOTE = "wheels/NOTES.txt"


def install_script() -> str:
    return ("#!/bin/sh\n"
            "# Install edge-tune with its [run] extra (llama.cpp, a small web stack; no torch)\n"
            "# from this bundle's wheels/, offline, into a virtual environment (default:\n"
            "# .venv here; or the folder given), then say how to serve. PYTHON picks the\n"
            "# interpreter (the wheels are for the Python that made the bundle).\n"
            "set -e\n"
            'here="$(cd "$(dirname "$0")" && pwd)"\n'
            'venv="${1:-$here/.venv}"\n'
            '"${PYTHON:-python3}" -m venv "$venv"\n'
            '"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \\\n'
            '    --find-links "$here/wheels" "edge-tune[run]"\n'
            'venv="$(cd "$venv" && pwd)"\n'
            'if [ "$venv" != "$here/.venv" ]; then echo "$venv" > "$here/.venv-path"; '
            'else rm -f "$here/.venv-path"; fi\n'
            'echo "installed: $venv/bin/edge-tune"\n'
            'echo "serve:     $venv/bin/edge-tune serve --bundle $here    (or $here/serve.sh)"\n')


def _source_root() -> "Path | None":
    """The source tree edge-tune runs from (pyproject.toml beside the package), or None when
    it was installed from a wheel."""
    import edge_tune

    root = Path(edge_tune.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    return root if pyproject.is_file() and 'name = "edge-tune"' in pyproject.read_text() \
        else None


def _own_wheel(dest: Path) -> str | None:
    """Build edge-tune's own wheel into ``dest`` (from a copy of the sources, so the tree
    gets no build/ folder); a one-line note instead when it cannot be built."""
    import shutil
    import subprocess
    import sys
    import tempfile

    root = _source_root()
    if root is None:
        return ("edge-tune: installed here from a wheel, not from sources; put that wheel "
                "(pip download edge-tune --no-deps) in wheels/")
    with tempfile.TemporaryDirectory(prefix="edge-tune-wheel-") as work:
        src = Path(work) / "src"
        for part in ("edge_tune", "converters", "tui"):
            shutil.copytree(root / part, src / part,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for part in ("pyproject.toml", "README.md"):
            shutil.copy(root / part, src / part)
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                               "--no-build-isolation", "--disable-pip-version-check",
                               "-w", str(dest), str(src)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip wheel failed"])[-1]
        return f"edge-tune: its wheel could not be built here ({last})"
    return None


def _llama_wheel() -> "Path | None":
    """The llama-cpp-python wheel pip built for this environment (its cache holds it: PyPI has
    only the source, which takes ~15 min to compile), matching the installed version."""
    import subprocess
    import sys
    from importlib import metadata

    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None
    out = subprocess.run([sys.executable, "-m", "pip", "cache", "list", "llama_cpp_python",
                          "--format=abspath"], capture_output=True, text=True)
    for line in out.stdout.split():
        if Path(line).name.startswith(f"llama_cpp_python-{version}-"):
            return Path(line)
    return None


def _run_requirements(llama: bool) -> list[str]:
    """edge-tune's own requirements and its [run] extra's, as the installed metadata states
    them (llama-cpp-python pinned to the installed version when its wheel is carried)."""
    import re
    from importlib import metadata

    reqs = []
    for req in metadata.requires("edge-tune") or []:
        spec, _, marker = req.partition(";")
        if marker and "extra" in marker and '"run"' not in marker and "'run'" not in marker:
            continue
        name = re.split(r"[<>=!~ \[]", spec.strip(), maxsplit=1)[0]
        if name.lower().replace("_", "-") == "llama-cpp-python":
            if not llama:
                continue
            spec = f"llama-cpp-python=={metadata.version('llama-cpp-python')}"
        reqs.append(spec.strip())
    return reqs


def build_wheelhouse(dest: Path, on_event: EventSink = ignore) -> list[str]:
    """Fill ``dest`` with the wheels ``pip install --no-index --find-links DIR
    "edge-tune[run]"`` needs on a box of this platform (this OS, CPU architecture and Python
    version): edge-tune's own (built now from its sources), llama-cpp-python's as built here,
    and every dependency (``pip download``, from PyPI or pip's cache; kept in
    ``cache_dir()/wheels`` by Python, platform and requirements). Returns one line for each
    thing missing and how to get it (empty: nothing is)."""
    import hashlib
    import shutil
    import subprocess
    import sys
    import sysconfig

    from edge_tune.fsutil import atomic_path, cache_dir

    on_event(Progress("wheels", 0, None, "", "collecting wheels for an offline install"))
    llama = _llama_wheel()
    reqs = _run_requirements(llama is not None)
    key = hashlib.sha256(f"{sys.version_info[:2]} {sysconfig.get_platform()} "
                         f"{llama.name if llama else '-'} {reqs}".encode()).hexdigest()[:16]
    deps = cache_dir() / "wheels" / key
    if not (deps / "notes.txt").is_file():
        with atomic_path(deps) as tmp:
            tmp.mkdir()
            notes = []
            if llama is not None:
                shutil.copy(llama, tmp / llama.name)
            else:
                notes.append("llama-cpp-python: no wheel built on this machine; on the box, "
                             "`pip install llama-cpp-python` compiles it (~15 min, needs a C++ "
                             "compiler and network), then run install.sh")
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet",
                                   "--disable-pip-version-check", "--only-binary=:all:",
                                   "--find-links", str(tmp), "--dest", str(tmp), *reqs],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["pip download failed"])[-1]
                notes.append(f"dependencies: not all could be fetched ({last}); on a machine "
                             "with network: pip download 'edge-tune[run]' -d wheels/")
            (tmp / "notes.txt").write_text("".join(n + "\n" for n in notes))
    notes = [n for n in (deps / "notes.txt").read_text().splitlines() if n]
    for wheel in sorted(deps.glob("*.whl")):
        shutil.copyfile(wheel, Path(dest) / wheel.name)
    own = _own_wheel(Path(dest))
    on_event(Progress("wheels", 1, 1, "", "wheels collected"))
    return ([own] if own else []) + notes
