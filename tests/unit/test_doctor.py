"""doctor: real probe of this machine, and backend choice with a reason for every "no"."""

from __future__ import annotations

import json

import pytest

from tests.helpers.cli import run_cli
from edge_tune.training import registry
from edge_tune.errors import EdgeTuneError
from edge_tune.hardware import AppleSilicon, CudaGpu, Hardware


def hw(**kw) -> Hardware:
    base = dict(os="Linux", python="3.11", cpu_model="x", arch="x86_64", physical_cores=2,
                logical_cores=2, ram_total_gib=24, ram_available_gib=20, disk_free_gib=50)
    return Hardware(**{**base, **kw})


def test_doctor_json_describes_this_machine():
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    h = report["hardware"]
    assert h["physical_cores"] >= 1 and h["ram_total_gib"] > 0 and h["cpu_model"]
    names = [b["name"] for b in report["backends"]]
    assert names == ["unsloth", "mlx", "cpu"]
    assert report["auto"]["backend"] == "cpu"  # no GPU, not a Mac: CPU here
    for b in report["backends"]:
        assert b["available"] or b["reason"] != "available"


def test_doctor_table():
    proc = run_cli("doctor")
    assert proc.returncode == 0 and "auto ->" in proc.stdout and "cpu" in proc.stdout


def test_reasons_for_no():
    plain = {a.name: a for a in registry.availability(hw())}
    assert "NVIDIA GPU" in plain["unsloth"].reason
    # mlx off Apple Silicon: usable on request when installed (the test extra installs its CPU
    # build), never picked by auto; the reason says why either way.
    assert not plain["mlx"].auto or not plain["mlx"].available
    assert "CPU" in plain["mlx"].reason or "not Apple Silicon" in plain["mlx"].reason
    gpu = {a.name: a for a in registry.availability(
        hw(cuda_gpus=[CudaGpu("H100", 80.0, "9.0", True)]))}
    assert "NVIDIA" not in gpu["unsloth"].reason and not gpu["unsloth"].available
    mac = {a.name: a for a in registry.availability(
        hw(arch="arm64", apple=AppleSilicon("Apple M3", 16.0, True)))}
    assert "Apple Silicon" not in mac["mlx"].reason and mac["mlx"].auto


def test_choose():
    assert registry.choose("auto", hw())[0] == "cpu"
    assert registry.choose("cpu", hw()) == ("cpu", "requested with --backend")
    with pytest.raises(EdgeTuneError, match="unknown"):
        registry.choose("tpu", hw())
    with pytest.raises(EdgeTuneError, match="not available here"):
        registry.choose("unsloth", hw())
    if registry.availability(hw())[1].available:  # mlx installed: on request only, off a Mac
        assert registry.choose("mlx", hw()) == ("mlx", "requested with --backend")
        assert registry.choose("auto", hw())[0] == "cpu"
