"""What the ``edge-tune`` commands share: the two consoles (results on stdout; progress and
errors on stderr) and the flag of a training setting, made from its TrainConfig field."""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from edge_tune.config import TrainConfig, cli_flags
from edge_tune.config_aliases import flag_aliases

out = Console()
err = Console(stderr=True)


def setting(name: str) -> Any:
    """The type typer reads ``TrainConfig.name``'s flag from: spellings, value type, metavar
    and help from the field's metadata (``edge_tune.config.option``). The parameter's default
    is None: "not given", so run.toml and then the field's default decide
    (:func:`edge_tune.config.build`)."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    kind = f.metadata.get("cli_type") or _field_types()[name]
    # other tools' spellings (--learning-rate for --lr): more names of the same option, also
    # said in its help (a narrow terminal cuts the column of names short)
    aliases = flag_aliases(name)
    return Annotated[Optional[kind], typer.Option(
        *cli_flags(f), *aliases, metavar=f.metadata.get("metavar"),
        help=f.metadata["help"] + (f" Also {', '.join(aliases)}." if aliases else ""))]


@functools.cache
def _field_types() -> dict[str, Any]:
    """TrainConfig's resolved field types, once: resolving evaluates every annotation, and
    the CLI makes every training flag at import."""
    return typing.get_type_hints(TrainConfig)
