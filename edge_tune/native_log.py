"""llama.cpp's own log: it prints straight to file descriptor 2, past Python's ``sys.stderr``.

A leaf module (standard library only), so that the engine and the converters that call llama.cpp
(the quantizer) hide the same log the same way without importing each other.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Send fd 2 to /dev/null inside the block (llama.cpp's load and quantize logs), and put it
    back after; does nothing when ``EDGE_TUNE_DEBUG`` is set, so the log shows."""
    if os.environ.get("EDGE_TUNE_DEBUG"):
        yield
        return
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
