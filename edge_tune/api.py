"""The headless core's facade: every front end (CLI, TUI, scripts) calls these names.

Each command takes an ``on_event`` sink for progress/metrics/logs (see :mod:`edge_tune.events`)
and returns plain data. The logic lives in one module per command (:mod:`edge_tune.commands`),
run directories in :mod:`edge_tune.runs`, and which adapter/base/template a command uses in
:mod:`edge_tune.adapters`; this module only re-exports them.
"""

from __future__ import annotations

from edge_tune.adapters import ChatTarget, open_engine, resolve_chat
from edge_tune.commands.bundle import bundle
from edge_tune.commands.chat import chat_plan, parse_adapter_options
from edge_tune.commands.convert import convert_base, fetch_converter
from edge_tune.commands.doctor import doctor
from edge_tune.commands.eval import EvalResult, TasksResult, evaluate, evaluate_tasks
from edge_tune.commands.export import export
from edge_tune.commands.inspect import bad_records, inspect_data, model_template
from edge_tune.commands.plan import plan
from edge_tune.commands.serve import open_serving, plan_serving, serve
from edge_tune.commands.train import train
from edge_tune.commands.verify import verify
from edge_tune.exporting.run import TrainResult
from edge_tune.exporting.steps import ExportResult
from edge_tune.runs import default_run_dir, delete_run, list_runs, resume_state
from edge_tune.server.plan import ServePlan
from edge_tune.verify import VerifyReport

__all__ = [
    # commands
    "doctor", "plan", "train", "inspect_data", "model_template", "bad_records", "export",
    "convert_base", "fetch_converter", "verify", "evaluate", "evaluate_tasks", "resolve_chat",
    "open_engine",
    "chat_plan", "parse_adapter_options", "plan_serving", "open_serving", "serve", "bundle",
    # runs on disk
    "default_run_dir", "resume_state", "list_runs", "delete_run",
    # what the commands return
    "TrainResult", "ExportResult", "VerifyReport", "EvalResult", "TasksResult", "ChatTarget",
    "ServePlan",
]
