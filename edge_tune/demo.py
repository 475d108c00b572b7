"""The demo's pieces: the bundled data, its held-back prompts, and base vs tuned answers.

``edge-tune demo`` itself (what it prints) is :mod:`edge_tune.render.demo`.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path


def demo_data() -> Path:
    return Path(str(resources.files("edge_tune") / "assets" / "demo.jsonl"))


def held_back_prompts() -> list[str]:
    return json.loads((resources.files("edge_tune") / "assets" / "demo_prompts.json").read_text())


def compare(run_dir: Path, prompts: list[str], max_tokens: int = 60) -> list[tuple[str, str, str]]:
    """(prompt, base answer, tuned answer) for each prompt, greedy, one llama.cpp load; each
    prompt is a new conversation of :class:`~edge_tune.chat_session.ChatSession` with the base
    and the adapter side by side."""
    from edge_tune.adapters import open_engine, resolve_chat
    from edge_tune.chat_session import ChatSession

    engine = open_engine(resolve_chat(run_dir, None))
    rows = []
    try:
        for p in prompts:
            session = ChatSession(engine, [("base", None), ("tuned", "adapter")],
                                  temperature=0.0, max_tokens=max_tokens)
            base, tuned = session.answer(p)
            rows.append((p, base.strip(), tuned.strip()))
    finally:
        engine.close()
    return rows
