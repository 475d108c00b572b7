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
class ServedModel:
    """One model a server (or a chat) answers as: the base, or the base with an adapter.

    ``adapter``: the adapter .gguf (None: the base). ``chat_template``: Jinja text (None: the
    base's, and for the base the GGUF's own ``tokenizer.chat_template``). ``stop_tokens``: a
    run's extra stop tokens. ``system_mode``: "keep" | "fold" (None: the base's, and for the
    base "keep"). ``system``: the run's training system prompt, sent when a chat has no
    system message (None: the base's)."""

    adapter: Optional[Path] = None
    chat_template: Optional[str] = None
    stop_tokens: tuple = ()
    system_mode: Optional[str] = None
    system: Optional[str] = None


BASE = "base"  # the name the base answers as


@dataclass
class ServePlan:
    """What a server (or a side-by-side chat) loads: one base, named adapters; ``models``
    maps every served name to its :class:`ServedModel`, the base (:data:`BASE`) first."""

    base: Path
    models: dict[str, ServedModel] = dataclasses.field(
        default_factory=lambda: {BASE: ServedModel()})
    base_sha256: Optional[str] = None  # known already (a bundle): skips hashing the base
    # --chat-template / --system-mode as given: adapters added while serving use them too
    chat_template_option: Optional[str] = None
    system_mode_option: Optional[str] = None

    @property
    def adapters(self) -> dict[str, ServedModel]:
        """The served adapters by name (every model but the base), in order."""
        return {n: m for n, m in self.models.items() if n != BASE}

    def override(self, chat_template: Optional[str], system_mode: Optional[str]) -> None:
        """``--chat-template`` / ``--system-mode`` given: every model uses them."""
        self.chat_template_option = chat_template or self.chat_template_option
        self.system_mode_option = system_mode or self.system_mode_option
        forced = template_choice.given(chat_template)
        for model in self.models.values():
            if forced is not None:
                model.chat_template = forced.text
            if system_mode is not None:
                model.system_mode = system_mode_option(system_mode)

    def add(self, name: str, target) -> None:
        """Serve ``target``'s adapter (a :class:`edge_tune.api.ChatTarget`) as ``name``, with
        the run's chat template."""
        self.models[name] = ServedModel(
            adapter=target.adapter,
            chat_template=target.chat_template.text if target.chat_template is not None
            else None,
            stop_tokens=tuple(target.stop_tokens or ()),
            system_mode=target.system_mode,
            system=target.training_system or None)
