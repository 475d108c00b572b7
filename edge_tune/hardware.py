"""Hardware probes for ``edge-tune doctor`` and backend choice.

Nothing heavy is imported here: CUDA GPUs are read from ``nvidia-smi``, whether the installed
torch is a CUDA build is read from ``torch/version.py`` as text, and Apple Silicon facts come
from ``sysctl``. That keeps ``doctor`` fast (well under a second) on every machine.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import psutil

# SIMD features that matter for CPU training/inference speed (torch, ggml).
_INTERESTING_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve",
)


@dataclass
class CudaGpu:
    name: str
    vram_gib: float
    compute_capability: str
    bf16: bool
    vram_free_gib: float | None = None
    driver: str = ""
    cuda: str = ""  # the newest CUDA version the driver supports (nvidia-smi's header)

    @property
    def compute_major_minor(self) -> tuple[int, int]:
        major, _, minor = self.compute_capability.partition(".")
        try:
            return int(major), int(minor or 0)
        except ValueError:
            return 0, 0


@dataclass
class AppleSilicon:
    chip: str
    unified_memory_gib: float
    metal: bool


@dataclass
class Hardware:
    os: str
    python: str
    cpu_model: str
    arch: str
    physical_cores: int
    logical_cores: int
    ram_total_gib: float
    ram_available_gib: float
    disk_free_gib: float
    simd: list[str] = field(default_factory=list)
    cuda_gpus: list[CudaGpu] = field(default_factory=list)
    apple: Optional[AppleSilicon] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def has_bf16_cpu(self) -> bool:
        """True when the CPU runs bf16 matmuls natively (AVX512-BF16 / AMX / Apple)."""
        return bool({"avx512_bf16", "amx_bf16"} & set(self.simd)) or self.apple is not None


def _gib(n: float) -> float:
    return round(n / 2**30, 1)


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    system = platform.system()
    if system == "Linux":
        try:
            text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            text = ""
        model = re.search(r"^(model name|Hardware|Processor)\s*:\s*(.+)$", text, re.M)
        flags = re.search(r"^(flags|Features)\s*:\s*(.+)$", text, re.M)
        have = set(flags.group(2).split()) if flags else set()
        return (model.group(2).strip() if model else platform.processor() or "unknown",
                [f for f in _INTERESTING_FLAGS if f in have])
    if system == "Darwin":
        model = _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.processor()
        flags = ["neon"] if platform.machine() == "arm64" else []
        feats = _run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"]).lower()
        flags += [f for f in _INTERESTING_FLAGS if f.replace("_", "") in feats.replace(".", "")]
        return model or "unknown", flags
    return platform.processor() or "unknown", []


def probe_simd() -> list[str]:
    """Just the SIMD flags (cheap)."""
    return _cpu_model_and_flags()[1]


GPU_QUERY = "name,memory.total,memory.free,compute_cap,driver_version"


def parse_gpu_query(text: str, cuda: str = "") -> list[CudaGpu]:
    """GPUs from ``nvidia-smi --query-gpu=GPU_QUERY --format=csv,noheader,nounits`` output
    (memory in MiB). Lines that do not parse are skipped: a MIG slice or an old driver may
    print ``[N/A]`` or ``[Not Supported]`` fields. Pure."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            continue
        name, total_mib, free_mib, cc, driver = parts
        try:
            major = int(cc.split(".")[0])
            vram = round(float(total_mib) / 1024, 1)
        except ValueError:
            continue
        try:
            free: float | None = round(float(free_mib) / 1024, 1)
        except ValueError:
            free = None
        gpus.append(CudaGpu(name=name, vram_gib=vram, compute_capability=cc, bf16=major >= 8,
                            vram_free_gib=free, driver=driver, cuda=cuda))
    return gpus


def parse_cuda_version(text: str) -> str:
    """The "CUDA Version: 12.4" of plain ``nvidia-smi`` output (not a --query-gpu field), or
    "". Pure."""
    m = re.search(r"CUDA Version\s*:\s*([0-9][0-9.]*)", text)
    return m.group(1) if m else ""


def _cuda_gpus() -> list[CudaGpu]:
    if not shutil.which("nvidia-smi"):
        return []
    out = _run(["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"])
    if not out:
        return []
    return parse_gpu_query(out, parse_cuda_version(_run(["nvidia-smi"])))


def _apple_silicon() -> Optional[AppleSilicon]:
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return None
    chip = _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or "Apple Silicon"
    # Every Apple Silicon Mac has Metal; mlx uses it through its own runtime.
    return AppleSilicon(chip=chip, unified_memory_gib=_gib(psutil.virtual_memory().total), metal=True)


def probe(disk_path: Optional[Path] = None) -> Hardware:
    """Describe this machine. Cheap: no torch/mlx import."""
    model, flags = _cpu_model_and_flags()
    vm = psutil.virtual_memory()
    path = disk_path or Path.home()
    while not path.exists() and path != path.parent:
        path = path.parent
    return Hardware(
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        cpu_model=model,
        arch=platform.machine(),
        physical_cores=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        logical_cores=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        ram_total_gib=_gib(vm.total),
        ram_available_gib=_gib(vm.available),
        disk_free_gib=_gib(shutil.disk_usage(path).free),
        simd=flags,
        cuda_gpus=_cuda_gpus(),
        apple=_apple_silicon(),
    )


def missing_modules(*modules: str) -> list[str]:
    """The subset of ``modules`` that is NOT importable (found without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def torch_cuda_version() -> Optional[str]:
    """CUDA version the installed torch was built for, or None (CPU build / no torch).

    Read from ``torch/version.py`` as text: importing torch takes seconds.
    """
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    version_file = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        text = version_file.read_text()
    except OSError:
        return None
    m = re.search(r"^cuda(?:\s*:\s*[^=]+)?\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return m.group(1) if m else None
