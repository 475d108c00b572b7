"""What the TUI needs of the core: exactly the functions its screens call, with the parameters
they pass. :mod:`edge_tune.api` is the core the app opens; ``tests/helpers/tui_fake.py`` is a stand-in
with fixed answers for the snapshot tests. Both are checked against :class:`Core` by
``tests/tui/test_tui_core_protocol.py``, which also fails when a screen calls a core function that
is not listed here: the screens never ask the core what it can do."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

from edge_tune.api import ChatTarget, EvalResult, ExportResult, TrainResult, VerifyReport
from edge_tune.config import TrainConfig
from edge_tune.events import EventSink
from edge_tune.llama.engine import Engine


@runtime_checkable
class Core(Protocol):
    """The core as the screens call it. Parameters after ``*`` are passed by keyword; a
    default (``...``) means a screen may leave the parameter out. Errors: ``EdgeTuneError``
    (and its kinds) with a one-line message the screens show as it is."""

    # Hardware
    def doctor(self) -> dict:
        """Hardware facts and each backend's availability (``render_doctor`` draws it)."""
        ...

    # Model & data
    def inspect_data(self, path: str, *, model: str = ..., seq_len: int = ..., fmt: str = ...,
                     on_event: EventSink = ..., chat_template: Optional[str] = ...) -> dict:
        """``edge-tune data inspect``'s report of ``path`` as ``model`` tokenizes it."""
        ...

    def model_template(self, model: str) -> dict:
        """Whether ``model`` brings its own chat template:
        ``{"known", "has", "name", "builtin", "fitting"}``."""
        ...

    def bad_records(self, path: str, fmt: str = ...) -> list[dict]:
        """Every invalid record of a data file: ``[{"line", "message"}]``."""
        ...

    # Train
    def plan(self, cfg: TrainConfig) -> dict:
        """The planner's estimate for ``cfg`` (``"summary"``: one line to show)."""
        ...

    def default_run_dir(self) -> Path:
        """A new run's directory name (``runs/run-DATE``)."""
        ...

    def train(self, cfg: Optional[TrainConfig], on_event: EventSink, *,
              cancel: Optional[threading.Event] = ..., resume: Optional[Path] = ...
              ) -> TrainResult:
        """Train ``cfg`` (or continue the cancelled run ``resume``, ``cfg`` None); raises
        ``Cancelled`` when ``cancel`` is set."""
        ...

    # Adapters (and the runs the Train and Chat screens list)
    def list_runs(self, root: Path) -> list[dict]:
        """The runs under ``root``, newest first, with their metrics."""
        ...

    def resume_state(self, run_dir: Path) -> Optional[dict]:
        """Where a cancelled run stands, or None when it cannot be resumed."""
        ...

    def delete_run(self, run_dir: Path) -> None:
        """Remove a run directory (refuses anything that is not a run)."""
        ...

    def export(self, adapter: Path, *, out: Optional[Path] = ..., outtype: str = ...,
               merge: bool = ..., quant: Optional[str] = ..., ollama: Optional[Path] = ...,
               on_event: EventSink = ...) -> ExportResult:
        """A run's adapter as GGUF (``merge``: merged into its base, ``quant`` its type or
        ``"auto"``; ``ollama``: a Modelfile into that directory)."""
        ...

    def verify(self, run: Path, *, on_event: EventSink = ...) -> VerifyReport:
        """torch+PEFT against llama.cpp on the run's held-back prompts."""
        ...

    def evaluate(self, run: Path, *, data: Optional[Path] = ..., on_event: EventSink = ...
                 ) -> EvalResult:
        """Base against tuned on held-out data (``data``, else the run's own)."""
        ...

    def bundle(self, runs: list[str], out: Path, *, on_event: EventSink = ...) -> Path:
        """Base and adapters in one folder for an edge box; returns where."""
        ...

    # Chat
    def resolve_chat(self, adapter: Optional[Path], base: Optional[str]) -> ChatTarget:
        """The base GGUF, adapter GGUF and template to chat with (``adapter`` None: the
        base alone)."""
        ...

    def open_engine(self, target: ChatTarget) -> Engine:
        """llama.cpp with ``target`` loaded, for a ``ChatSession``; the caller closes it."""
        ...
