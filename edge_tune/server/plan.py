"""What a server (or a side-by-side chat) loads: :class:`ServePlan`. Built by
:func:`edge_tune.api.plan_serving` from run directories and adapter files, or by
:func:`edge_tune.bundle.load_bundle` from a bundle."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edge_tune.templates import choice as template_choice
from edge_tune.templates.choice import system_mode_option


def quote_system(text: str, limit: int = 80) -> str:
    """A system prompt as a notice quotes it: in quotes, on one line, cut at ``limit``
    characters. Pure."""
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit - 1] + "…")


@dataclass
class ServePlan:
    """What a server (or a side-by-side chat) loads: one base, named adapters."""

    base: Path
    adapters: dict  # name -> adapter .gguf Path
    base_sha256: Optional[str] = None  # known already (a bundle): skips hashing the base
    # model name ("base" or an adapter's) -> Jinja text; a name without one uses the base's,
    # and a base without one uses the GGUF's own tokenizer.chat_template
    templates: dict = dataclasses.field(default_factory=dict)
    stop_tokens: dict = dataclasses.field(default_factory=dict)  # name -> a run's stop tokens
    system_modes: dict = dataclasses.field(default_factory=dict)  # name -> "keep" | "fold"
    # name -> the run's training system prompt, sent when a chat has no system message (a
    # name without one uses the base's, as templates do)
    systems: dict = dataclasses.field(default_factory=dict)
    # --chat-template / --system-mode as given: adapters added while serving use them too
    chat_template_option: Optional[str] = None
    system_mode_option: Optional[str] = None

    def override(self, chat_template: Optional[str], system_mode: Optional[str]) -> None:
        """``--chat-template`` / ``--system-mode`` given: every model uses them."""
        self.chat_template_option = chat_template or self.chat_template_option
        self.system_mode_option = system_mode or self.system_mode_option
        forced = template_choice.given(chat_template)
        for name in ["base", *self.adapters]:
            if forced is not None:
                self.templates[name] = forced.text
            if system_mode is not None:
                self.system_modes[name] = system_mode_option(system_mode)

    def add(self, name: str, target) -> None:
        """Serve ``target``'s adapter (a :class:`edge_tune.api.ChatTarget`) as ``name``, with
        the run's chat template."""
        self.adapters[name] = target.adapter
        self.system_modes[name] = target.system_mode
        if target.chat_template is not None:
            self.templates[name] = target.chat_template.text
        if target.stop_tokens:
            self.stop_tokens[name] = target.stop_tokens
        if target.training_system:
            self.systems[name] = target.training_system
