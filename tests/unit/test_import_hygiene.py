"""The core and the CLI import on any box, fast: no heavy library at module level."""

import json
import subprocess
import sys

HEAVY = ["torch", "transformers", "peft", "llama_cpp", "mlx", "mlx_lm", "unsloth", "textual",
         "accelerate", "datasets", "starlette", "uvicorn"]

MODULES = ["edge_tune", "edge_tune.api", "edge_tune.cli", "edge_tune.llama.engine",
           "edge_tune.training.runner", "edge_tune.models", "edge_tune.hardware", "edge_tune.config",
           "edge_tune.manifest", "edge_tune.demo", "edge_tune.data.formats",
           "edge_tune.data.template", "edge_tune.training.registry", "edge_tune.training.backends.cpu",
           "edge_tune.training.worker", "edge_tune.training.backends.unsloth", "edge_tune.training.backends.attention",
           "edge_tune.converters.formats.peft_to_gguf",
           "edge_tune.converters.formats.validate", "edge_tune.converters.formats.gguf_f32",
           "edge_tune.converters.formats.merge", "edge_tune.converters.integrations.quantize",
           "edge_tune.converters.integrations.ollama", "edge_tune.converters.integrations.hf_to_gguf", "edge_tune.verify", "edge_tune.tui",
           "edge_tune.data.inspect", "edge_tune.render.inspect", "edge_tune.training.checkpoint",
           "edge_tune.server", "edge_tune.server.app", "edge_tune.server.scheduler",
           "edge_tune.server.openai_shapes", "edge_tune.bundle", "edge_tune.planner",
           "edge_tune.render.plan", "edge_tune.training.backends.mlx",
           "edge_tune.converters.formats.mlx_to_peft", "edge_tune.converters.integrations.vllm_export",
           "edge_tune.converters.formats.gguf_header", "edge_tune.native_log"]


def _loaded_after(code: str) -> list[str]:
    probe = (code + "\nimport sys, json\n"
             f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_core_modules_import_no_heavy_libraries():
    assert _loaded_after("\n".join(f"import {m}" for m in MODULES)) == []


def test_cli_help_loads_no_heavy_library():
    code = ("import sys\nfrom edge_tune.cli import app\n"
            "try:\n    app(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "for cmd in ('train', 'export', 'chat', 'doctor', 'demo', 'tui', 'serve', "
            "'bundle', 'verify', 'convert-base', 'plan'):\n"
            "    try:\n        app([cmd, '--help'], standalone_mode=False)\n"
            "    except SystemExit:\n        pass")
    assert _loaded_after(code) == []


def test_doctor_loads_no_heavy_library():
    assert _loaded_after("from edge_tune import api\napi.doctor()") == []


def test_help_is_instant():
    import time

    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edge_tune", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - t < 3.0
