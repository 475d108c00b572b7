"""An edge box installs edge-tune offline from a bundle: `bundle` carries wheels/ (edge-tune's
own wheel, llama-cpp-python's as built here, every dependency of the `[run]` extra) and
install.sh; the test runs install.sh into a fresh venv (pip --no-index) and serves the bundle
from that venv, one real request on a loopback port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from serve_helpers import http_json, one_llama_thread, running_server
from tiny_models import tiny_adapter

from edge_tune.bundle import _llama_wheel


@pytest.mark.slow
def test_bundle_installs_offline_in_a_fresh_venv_and_serves(tiny, tmp_path):
    if _llama_wheel() is None:
        pytest.skip("no built llama-cpp-python wheel in pip's cache (installing would compile "
                    "llama.cpp for ~15 minutes)")
    adapter = tiny_adapter(tmp_path / "strong.gguf")
    box = tmp_path / "box"
    proc = run_cli("bundle", f"strong={adapter}", "--base", str(tiny), "-o", str(box))
    assert proc.returncode == 0, proc.stderr
    wheels = sorted(p.name for p in (box / "wheels").glob("*.whl"))
    assert any(w.startswith("edge_tune-") for w in wheels), wheels
    assert any(w.startswith("llama_cpp_python-") for w in wheels), wheels
    assert not (box / "wheels" / "NOTES.txt").exists()  # nothing missing
    assert os.access(box / "install.sh", os.X_OK)
    assert "./install.sh" in (box / "README.md").read_text()
    index = json.loads((box / "bundle.json").read_text())
    assert "install.sh" in index["files"]

    venv = tmp_path / "edge-box-venv"
    env = dict(os.environ, PYTHON=sys.executable)
    install = subprocess.run([str(box / "install.sh"), str(venv)], capture_output=True,
                             text=True, env=env, timeout=900, cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr[-3000:]
    assert f"serve:     {venv}/bin/edge-tune serve --bundle {box}" in install.stdout
    py = str(venv / "bin" / "python")
    probe = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True)
    assert "ModuleNotFoundError" in probe.stderr  # [run] alone: no torch on the box

    with one_llama_thread(), running_server("--bundle", str(box), python=py) as server:
        status, resp = http_json("POST", server.url + "/v1/chat/completions", json.dumps(
            {"model": "strong", "temperature": 0, "max_tokens": 4,
             "messages": [{"role": "user", "content": "Hello"}]}).encode(),
            {"Content-Type": "application/json"})
        assert status == 200, resp
        assert resp["model"] == "strong" and resp["choices"][0]["message"]["content"]
    assert Path(venv / "bin" / "edge-tune").is_file()
