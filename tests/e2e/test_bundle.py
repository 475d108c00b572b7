"""`edge-tune bundle`: what goes in, checksums verified on load, and the bundle running in a
fresh virtual environment that has only the `[run]` extra (no torch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from tests.helpers.cli import assert_one_line_error, run_cli
from tests.helpers.serve_helpers import (
    PROMPTS,
    cli_answer,
    http_json,
    one_llama_thread,
    running_server,
    trained_adapters,
)

from edge_tune.bundle import _llama_wheel, default_name, plan_bundle, split_run_arg
from edge_tune.errors import EdgeTuneError

MAX_TOKENS = 24


@pytest.fixture(scope="module", autouse=True)
def _one_llama_thread():
    with one_llama_thread():
        yield


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return trained_adapters()


@pytest.fixture(scope="module")
def bundle_dir(adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "edge-box"
    proc = run_cli("bundle", str(adapters["pirate"]), f"anti={adapters['anti']}", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_bundle_holds_base_adapters_manifests_and_checksums(bundle_dir, default_gguf):
    index = json.loads((bundle_dir / "bundle.json").read_text())
    assert index["format"] == "edge-tune-bundle/1"
    assert sorted(index["adapters"]) == ["anti", "serve-pirate"]
    assert index["base"] == f"base/{default_gguf.name}"
    on_disk = sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*")
                     if p.is_file() and p.name != "bundle.json")
    assert sorted(index["files"]) == on_disk
    assert {"README.md", "serve.sh", "chat_template.jinja", "manifests/serve-pirate.json",
            "adapters/anti.gguf"} <= set(on_disk)
    assert os.access(bundle_dir / "serve.sh", os.X_OK)
    assert "edge-tune serve --bundle" in (bundle_dir / "serve.sh").read_text()
    assert "<|im_start|>" in (bundle_dir / "chat_template.jinja").read_text()
    base_sum = index["files"][index["base"]]
    from edge_tune.models import DEFAULT_SHA256

    assert base_sum == DEFAULT_SHA256


def test_bundle_answers_like_the_run_it_came_from(bundle_dir, adapters):
    proc = run_cli("chat", "--bundle", str(bundle_dir), "--adapter", "serve-pirate", "--prompt",
                   PROMPTS[0], "--temperature", "0", "--max-tokens", str(MAX_TOKENS))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout[:-1] == cli_answer(PROMPTS[0], adapters["pirate"], MAX_TOKENS)


def test_tampered_bundle_is_refused_in_one_line(bundle_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    with open(copy / "adapters/anti.gguf", "r+b") as f:  # flip one byte in the tensor data
        f.seek(-10, 2)
        byte = f.read(1)
        f.seek(-10, 2)
        f.write(bytes([byte[0] ^ 1]))
    proc = run_cli("chat", "--bundle", str(copy), "--adapter", "anti", "--prompt", "hi")
    assert_one_line_error(proc, "anti.gguf", "sha256", "does not match")
    (copy / "adapters/anti.gguf").unlink()
    assert_one_line_error(run_cli("serve", "--bundle", str(copy)), "anti.gguf", "missing")
    assert_one_line_error(run_cli("chat", "--bundle", str(bundle_dir), "--adapter", "nope",
                                  "--prompt", "hi"), "nope", "serve-pirate")
    assert_one_line_error(run_cli("chat", "--bundle", str(tmp_path), "--prompt", "hi"),
                          "bundle.json")


def test_tar_gz_bundle_round_trips(adapters, tmp_path):
    out = tmp_path / "box.tar.gz"
    proc = run_cli("bundle", f"anti={adapters['anti']}", "-o", str(out), "--no-wheels")
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert "box/bundle.json" in names and "box/adapters/anti.gguf" in names
    proc = run_cli("chat", "--bundle", str(out), "--adapter", "anti", "--prompt", PROMPTS[1],
                   "--temperature", "0", "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout[:-1] == cli_answer(PROMPTS[1], adapters["anti"], 8)


def test_bundle_bad_inputs(adapters, tmp_path):
    assert_one_line_error(run_cli("bundle", str(tmp_path / "nothing"), "-o",
                                  str(tmp_path / "o")), "nothing")
    assert_one_line_error(run_cli("bundle", f"base={adapters['anti']}", "-o",
                                  str(tmp_path / "o")), "reserved")
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_planning_is_pure():
    assert split_run_arg("pirate=runs/demo") == ("pirate", "runs/demo")
    assert split_run_arg("runs/a=b") == (None, "runs/a=b")
    assert default_name(Path("runs/run-2026 11 22")) == "run-2026-11-22"
    assert default_name(Path("x/legal.gguf")) == "legal"
    plan = plan_bundle(Path("m/base.gguf"), [("a", Path("a.gguf"), {"k": 1}),
                                             ("b", Path("b.gguf"), None)])
    assert [e.dest for e in plan.entries] == ["base/base.gguf", "adapters/a.gguf",
                                              "adapters/b.gguf"]
    assert list(plan.manifests) == ["a"]
    with pytest.raises(EdgeTuneError, match="both be named"):
        plan_bundle(Path("b.gguf"), [("a", Path("1.gguf"), None), ("a", Path("2.gguf"), None)])


# --- on an "edge box": a fresh venv with only the [run] extra ---------------------------------

@pytest.mark.slow
def test_bundle_runs_in_a_fresh_venv_with_only_the_run_extra(bundle_dir, adapters, tmp_path):
    """The bundle carries wheels/ (edge-tune's own, llama-cpp-python's as built here, the
    [run] extra's dependencies) and install.sh: installed offline (pip --no-index) into a
    fresh venv, it answers exactly as the runs do, with no torch on the box."""
    if _llama_wheel() is None:
        pytest.skip("no built llama-cpp-python wheel in pip's cache (installing would compile "
                    "llama.cpp for ~15 minutes)")
    box = bundle_dir
    wheels = sorted(p.name for p in (box / "wheels").glob("*.whl"))
    assert any(w.startswith("edge_tune-") for w in wheels), wheels
    assert any(w.startswith("llama_cpp_python-") for w in wheels), wheels
    assert not (box / "wheels" / "NOTES.txt").exists()  # nothing missing
    assert os.access(box / "install.sh", os.X_OK)
    assert "./install.sh" in (box / "README.md").read_text()
    assert "install.sh" in json.loads((box / "bundle.json").read_text())["files"]
    venv = tmp_path / "edge-box-venv"
    install = subprocess.run([str(box / "install.sh"), str(venv)], capture_output=True,
                             text=True, env=dict(os.environ, PYTHON=sys.executable),
                             timeout=900, cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr[-3000:]
    assert f"serve:     {venv}/bin/edge-tune serve --bundle {box}" in install.stdout
    py = str(venv / "bin" / "python")

    for heavy in ("torch", "transformers", "peft", "mlx", "textual"):
        probe = subprocess.run([py, "-c", f"import {heavy}"], check=False, capture_output=True,
                               text=True)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, heavy

    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    chat = subprocess.run([str(venv / "bin" / "edge-tune"), "chat", "--bundle", str(bundle_dir),
                           "--adapter", "anti", "--prompt", PROMPTS[2], "--temperature", "0",
                           "--max-tokens", str(MAX_TOKENS)], check=False, capture_output=True,
                          text=True, env=env, timeout=600)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout[:-1] == cli_answer(PROMPTS[2], adapters["anti"], MAX_TOKENS)

    with running_server("--bundle", str(bundle_dir), python=py) as server:
        status, models = http_json("GET", server.url + "/v1/models")
        assert status == 200
        assert [m["id"] for m in models["data"]] == ["base", "serve-pirate", "anti"]
        status, resp = http_json("POST", server.url + "/v1/chat/completions", json.dumps(
            {"model": "serve-pirate", "temperature": 0, "max_tokens": MAX_TOKENS,
             "messages": [{"role": "user", "content": PROMPTS[0]}]}).encode(),
            {"Content-Type": "application/json"})
        assert status == 200
        assert resp["choices"][0]["message"]["content"] == cli_answer(
            PROMPTS[0], adapters["pirate"], MAX_TOKENS)


@pytest.mark.slow
def test_merged_bundle_answers_like_the_adapter(adapters, tmp_path):
    """--merged: one model file with the adapter folded in (F16, so a short run's small
    weight deltas survive), served as 'base'; it answers as base + adapter does."""
    out = tmp_path / "merged"
    proc = run_cli("bundle", str(adapters["pirate"]), "-o", str(out), "--merged",
                   "--no-wheels")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "bundle.json").read_text())
    assert index["merged"] == "serve-pirate" and index["adapters"] == {}
    chat = run_cli("chat", "--bundle", str(out), "--prompt", PROMPTS[0], "--temperature", "0",
                   "--max-tokens", "12")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.startswith("Arr")
    assert cli_answer(PROMPTS[0], adapters["pirate"], 12).startswith("Arr")


def test_serve_sh_finds_the_venv_install_sh_was_given(tmp_path):
    """``install.sh VENV`` keeps VENV in .venv-path; ``serve.sh`` then runs that edge-tune,
    not whatever is on PATH."""
    import os
    import subprocess

    from edge_tune.bundle import launcher_script

    box, venv = tmp_path / "box", tmp_path / "elsewhere"
    (venv / "bin").mkdir(parents=True)
    box.mkdir()
    fake = venv / "bin" / "edge-tune"
    fake.write_text('#!/bin/sh\necho "venv edge-tune: $*"\n')
    fake.chmod(0o755)
    (box / "serve.sh").write_text(launcher_script())
    (box / "serve.sh").chmod(0o755)
    (box / ".venv-path").write_text(f"{venv}\n")
    proc = subprocess.run([str(box / "serve.sh"), "--port", "9000"], capture_output=True,
                          text=True, env={**os.environ, "PATH": "/usr/bin:/bin"}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"venv edge-tune: serve --bundle {box} --port 9000"
