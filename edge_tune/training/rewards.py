"""GRPO's reward functions: built-ins named on the command line, and user functions.

A reward spec (``train --reward SPEC``, repeatable) is one of:

* ``regex:PATTERN`` - 1.0 when the completion matches PATTERN (``re.search``, DOTALL: anchor
  with ``^...$`` to match the whole answer), else 0.0;
* ``json`` - 1.0 when the completion (a ```json fence allowed around it) is valid JSON;
* ``json-schema:FILE`` - 1.0 when it is valid JSON matching the schema in FILE (a subset of
  JSON Schema: type, properties, required, additionalProperties, items, enum, const,
  minimum/maximum, minLength/maxLength, minItems/maxItems, pattern), 0.5 when it is JSON that
  does not match, 0.0 when it is not JSON;
* ``exact:COLUMN`` - 1.0 when the completion, stripped, equals the record's COLUMN stripped;
* ``numeric:COLUMN`` - 1.0 when the last number in the completion equals COLUMN's number
  (to 1e-6 relative), else 0.0;
* ``tool-call`` - 1.0 when the completion holds a tool call that parses: a JSON object with a
  string ``name`` and an object ``arguments`` (bare, or inside ``<tool_call>...</tool_call>``),
  whose name is one of the record's ``tools`` when it has them;
* ``length:N`` - how close the completion's length in characters is to N:
  ``max(0, 1 - |len - N| / N)``;
* ``MODULE:FUNCTION`` or ``FILE.py:FUNCTION`` - a user function with TRL's signature
  ``fn(prompts, completions, **columns) -> list[float]`` (a None in the list: this function
  does not score that completion). As TRL passes conversational data, ``prompts`` are message
  lists and each completion is ``[{"role": "assistant", "content": TEXT}]``; ``columns`` are
  the records' other keys, one list per key.

Several rewards add up, each times its weight (``--reward-weights``, default 1 each), as
TRL's ``reward_weights``. Pure: no heavy imports; a user function is imported when parsed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from edge_tune.errors import UsageError

BUILTINS = ("regex", "json", "json-schema", "exact", "numeric", "tool-call", "length")
SPEC_HELP = ("regex:PATTERN | json | json-schema:FILE | exact:COLUMN | numeric:COLUMN | "
             "tool-call | length:N | MODULE:FUNCTION | FILE.py:FUNCTION")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class Reward:
    """One reward function: ``name`` (its spec, as metrics name it), ``fn`` (TRL's
    signature), ``weight``, and ``column`` (the record column it reads, or None)."""

    name: str
    fn: Callable[..., list]
    weight: float = 1.0
    column: Optional[str] = None


# ---- the built-ins (each: one completion's text, its record's columns -> float) -----------

def _strip_fence(text: str) -> str:
    t = text.strip()
    m = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", t, re.DOTALL)
    return m.group(1) if m else t


def _as_json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(_strip_fence(text))
    except ValueError:
        return False, None


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES.get(kind, object))


def schema_errors(value: Any, schema: dict, at: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (the JSON Schema subset the module names), as
    ``"$.key: why"`` lines; empty when it matches. Pure."""
    errors: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_type_ok(value, k) for k in kinds):
            return [f"{at}: expected {'/'.join(kinds)}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{at}: not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{at}: not {schema['const']!r}")
    errors += _number_errors(value, schema, at) + _size_errors(value, schema, at)
    if isinstance(value, dict):
        errors += _object_errors(value, schema, at)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{at}[{i}]")
    return errors


def _number_errors(value: Any, schema: dict, at: str) -> list[str]:
    if not _type_ok(value, "number"):
        return []
    out = []
    if "minimum" in schema and value < schema["minimum"]:
        out.append(f"{at}: below {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        out.append(f"{at}: above {schema['maximum']}")
    return out


def _size_errors(value: Any, schema: dict, at: str) -> list[str]:
    out = []
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength",
                                                                              math.inf):
            out.append(f"{at}: length {len(value)} out of range")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{at}: does not match {schema['pattern']!r}")
    if isinstance(value, list) and not (schema.get("minItems", 0) <= len(value)
                                        <= schema.get("maxItems", math.inf)):
        out.append(f"{at}: {len(value)} items out of range")
    return out


def _object_errors(value: dict, schema: dict, at: str) -> list[str]:
    out = [f"{at}: missing {k!r}" for k in schema.get("required", []) if k not in value]
    props = schema.get("properties", {})
    for k, v in value.items():
        if k in props:
            out += schema_errors(v, props[k], f"{at}.{k}")
        elif schema.get("additionalProperties") is False:
            out.append(f"{at}: unexpected key {k!r}")
    return out


def last_number(text: str) -> Optional[float]:
    """The last number written in ``text`` (thousands commas allowed), or None. Pure."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _tool_calls(text: str) -> list[Any]:
    inner = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.DOTALL)
    candidates = inner or [_strip_fence(text)]
    calls = []
    for c in candidates:
        ok, value = _as_json(c)
        if ok:
            calls += value if isinstance(value, list) else [value]
    return calls


def _tool_names(tools: Any) -> Optional[set]:
    if not isinstance(tools, list) or not tools:
        return None
    names = set()
    for t in tools:
        if isinstance(t, dict):
            f = t.get("function", t)
            if isinstance(f, dict) and isinstance(f.get("name"), str):
                names.add(f["name"])
    return names or None


def tool_call_score(text: str, tools: Any = None) -> float:
    """1.0 when ``text`` holds a tool call that parses (see the module), else 0.0. Pure."""
    calls = _tool_calls(text)
    allowed = _tool_names(tools)
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return 0.0
        args = call.get("arguments", call.get("parameters"))
        if isinstance(args, str):
            ok, args = _as_json(args)
        if not isinstance(args, dict):
            return 0.0
        if allowed is not None and call["name"] not in allowed:
            return 0.0
    return 1.0 if calls else 0.0


def _per_text(score: Callable[[str, dict], float]) -> Callable[..., list]:
    """A TRL-signature function from a per-completion scorer of (text, that record's
    columns)."""
    def fn(prompts, completions, **columns):
        out = []
        for i, c in enumerate(completions):
            row = {k: v[i] for k, v in columns.items() if isinstance(v, list) and len(v) > i}
            out.append(float(score(completion_text(c), row)))
        return out
    return fn


def completion_text(completion: Any) -> str:
    """A completion as text: a string as it is; TRL's conversational form (a list of
    messages) as its last message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


def _column(row: dict, column: str) -> Any:
    if column not in row:
        raise KeyError(column)
    return row[column]


def _numeric(text: str, row: dict, column: str) -> float:
    want = _column(row, column)
    want = want if isinstance(want, (int, float)) else last_number(str(want))
    got = last_number(text)
    if got is None or want is None:
        return 0.0
    return 1.0 if math.isclose(got, float(want), rel_tol=1e-6, abs_tol=1e-9) else 0.0


def _builtin(kind: str, arg: str, where: str) -> tuple[Callable[[str, dict], float],
                                                       Optional[str]]:
    """(per-completion scorer, the column it reads) of a built-in; UsageError naming
    ``where`` for a bad argument."""
    if kind in ("json", "tool-call") and arg:
        raise UsageError(f"{where}: '{kind}' takes no argument (expected {kind!r})")
    if kind not in ("json", "tool-call") and not arg:
        raise UsageError(f"{where}: '{kind}' needs an argument (expected one of {SPEC_HELP})")
    if kind == "regex":
        try:
            pattern = re.compile(arg, re.DOTALL)
        except re.error as exc:
            raise UsageError(f"{where}: not a regular expression ({exc})") from None
        return (lambda t, r: 1.0 if pattern.search(t) else 0.0), None
    if kind == "json":
        return (lambda t, r: 1.0 if _as_json(t)[0] else 0.0), None
    if kind == "json-schema":
        schema = _read_schema(Path(arg), where)
        return (lambda t, r: _schema_score(t, schema)), None
    if kind == "exact":
        return (lambda t, r: 1.0 if t.strip() == str(_column(r, arg)).strip() else 0.0), arg
    if kind == "numeric":
        return (lambda t, r: _numeric(t, r, arg)), arg
    if kind == "tool-call":
        return (lambda t, r: tool_call_score(t, r.get("tools"))), None
    try:
        target = int(arg)
        assert target > 0
    except (ValueError, AssertionError):
        raise UsageError(f"{where}: length:N needs N, a number of characters > 0 "
                         f"(got {arg!r})") from None
    return (lambda t, r: max(0.0, 1.0 - abs(len(t) - target) / target)), None


def _schema_score(text: str, schema: dict) -> float:
    ok, value = _as_json(text)
    if not ok:
        return 0.0
    return 0.5 if schema_errors(value, schema) else 1.0


def _read_schema(path: Path, where: str) -> dict:
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{where}: {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{where}: {path}: not a JSON schema ({exc})") from None
    if not isinstance(schema, dict):
        raise UsageError(f"{where}: {path}: a JSON schema is an object")
    return schema


def _user_function(module: str, name: str, where: str) -> Callable[..., list]:
    """``module:name`` (a module on sys.path, the current directory included, or a .py
    file) imported; UsageError for one that is missing or not callable."""
    try:
        if module.endswith(".py"):
            path = Path(module).resolve()
            if not path.is_file():
                raise UsageError(f"{where}: {module}: no such file")
            spec = importlib.util.spec_from_file_location(f"edge_tune_reward_{path.stem}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            mod = importlib.import_module(module)
    except UsageError:
        raise
    except Exception as exc:  # the user's module: any error is theirs to fix
        raise UsageError(f"{where}: could not import {module} ({type(exc).__name__}: "
                         f"{exc})") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise UsageError(f"{where}: {module} has no function {name!r} (expected "
                         "fn(prompts, completions, **columns) -> list[float])")
    return fn


def parse_reward(spec: str, weight: float = 1.0) -> Reward:
    """One ``--reward`` spec (see the module) as a :class:`Reward`. Raises UsageError (one
    line, naming the spec) for an unknown built-in argument, a bad pattern, schema or
    length, a user module that does not import or lacks the function."""
    where = f"--reward {spec}"
    kind, _, arg = spec.partition(":")
    if kind in BUILTINS:
        score, column = _builtin(kind, arg, where)
        return Reward(spec, _per_text(score), weight, column)
    if not arg or not kind:
        raise UsageError(f"{where}: unknown reward (expected one of {SPEC_HELP})")
    module, _, name = spec.rpartition(":")
    return Reward(spec, _user_function(module, name, where), weight)


def parse_rewards(specs: list[str], weights: Optional[list[float]] = None) -> list[Reward]:
    """Every ``--reward`` with its weight (``--reward-weights``: one per reward, default 1
    each). UsageError for none, or a count of weights that does not match."""
    if not specs:
        raise UsageError(f"needs at least one --reward ({SPEC_HELP})", setting="method",
                         value="grpo")
    if weights and len(weights) != len(specs):
        raise UsageError(f"{len(weights)} weights for {len(specs)} rewards "
                         "(expected one per --reward, in order)", setting="reward_weights")
    return [parse_reward(s, w) for s, w in zip(specs, weights or [1.0] * len(specs))]


def check_columns(rewards: list[Reward], columns: set[str]) -> None:
    """UsageError naming the first reward whose column no record has."""
    for r in rewards:
        if r.column is not None and r.column not in columns:
            have = ", ".join(sorted(columns)) or "none"
            raise UsageError(f"no record has a column {r.column!r} "
                             f"(columns: {have})", setting="reward", value=r.name)


def score(rewards: list[Reward], prompts: list, completions: list[str],
          columns: dict[str, list]) -> tuple[list[list[float]], list[float]]:
    """Score ``completions`` (texts, one per prompt in ``prompts``, message lists) with every
    reward: ``(per_reward, total)``; ``per_reward[k][i]``: reward ``k`` of completion ``i``
    (NaN where the function returned None), ``total[i]``: the weighted sum over the rewards
    that scored it (NaN when none did), as TRL sums. ``columns``: key -> one value per
    completion. Raises UsageError when a function returns the wrong count or a non-number."""
    conversational = [[{"role": "assistant", "content": c}] for c in completions]
    per: list[list[float]] = []
    for r in rewards:
        given = conversational if r.column is None and r.name.split(":")[0] not in BUILTINS \
            else completions
        try:
            values = r.fn(prompts=prompts, completions=given, **columns)
        except KeyError as exc:
            raise UsageError(f"a record has no column {exc}",
                             setting="reward", value=r.name) from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            raise UsageError(f"returned {type(values).__name__} "
                             f"of {len(values) if hasattr(values, '__len__') else '?'} "
                             f"(expected a list of {len(completions)} floats)",
                             setting="reward", value=r.name)
        try:
            per.append([math.nan if v is None else float(v) for v in values])
        except (TypeError, ValueError):
            raise UsageError("returned a value that is not a number "
                             f"({values[:3]!r}...)", setting="reward", value=r.name) from None
    total = []
    for i in range(len(completions)):
        scored = [(r.weight * p[i]) for r, p in zip(rewards, per) if not math.isnan(p[i])]
        total.append(sum(scored) if scored else math.nan)
    return per, total
