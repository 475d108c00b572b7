"""Load many adapter GGUFs onto one base in llama.cpp, one after another, in this process.

    python adapter_loader.py JOBS.json

``JOBS.json``: {"base": path, "mode": "checked" | "bypass", "adapters": [path, ...]}. For each
adapter a line ``START i`` is printed (flushed) before llama.cpp sees it, then one JSON line
with what happened. If llama.cpp takes the process down, the caller knows which adapter did it
(the last START without a result) and starts a new process after it.

``checked``: through ``Engine.add_adapter`` (edge-tune's shared check first). ``bypass``:
straight into llama.cpp (``llama_adapter_lora_init``), as if there were no check.
"""

from __future__ import annotations

import ctypes
import json
import sys

import numpy as np


def main(jobs_path: str, start: int = 0) -> None:
    import llama_cpp

    from edge_tune.llama.engine import Engine
    from edge_tune.errors import EdgeTuneError

    jobs = json.loads(open(jobs_path).read())
    tokens = [1, 5, 17, 42]  # inside every test vocabulary (the tiny families have ~520)
    with Engine(jobs["base"], n_ctx=64, logits_all=True, exact=True) as eng:
        base = eng.logits(tokens)
        for i, path in enumerate(jobs["adapters"]):
            if i < start:
                continue
            print(f"START {i}", flush=True)
            result = {"i": i}
            try:
                if jobs["mode"] == "checked":
                    name = eng.add_adapter(path, f"a{i}")
                    eng.activate(name)
                else:
                    ptr = llama_cpp.llama_adapter_lora_init(eng.llm.model, path.encode())
                    result["null"] = not ptr
                    arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(ptr)
                    llama_cpp.llama_set_adapters_lora(eng.llm.ctx, arr, 1,
                                                      (ctypes.c_float * 1)(1.0))
                    eng.llm.reset()
                got = eng.logits(tokens)
                result.update(status="ok", finite=bool(np.isfinite(got).all()),
                              effect=float(np.linalg.norm(got - base)))
            except EdgeTuneError as exc:
                msg = str(exc)
                result.update(status="refused", message=msg, one_line="\n" not in msg)
            finally:
                eng.activate(None)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
