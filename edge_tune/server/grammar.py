"""llama.cpp grammars (GBNF) for structured answers: OpenAI's ``response_format`` and forced
tool calls.

JSON Schema goes to GBNF through llama-cpp-python's port of llama.cpp's own converter
(:func:`edge_tune.llama.gbnf.schema_converter`, from ``json_schema_to_grammar.py``); any-JSON
answers use llama.cpp's ``json.gbnf``. Every grammar is parsed once by llama.cpp
(:func:`compiled`) before a request is queued: llama-cpp-python adds a grammar sampler without
checking it, and a grammar llama.cpp refuses would reach the sampler chain as a NULL pointer.

Errors are :class:`~edge_tune.server.errors.RequestError` (HTTP 400) naming the field.
"""

from __future__ import annotations

import json

from edge_tune.server.errors import RequestError


# JSON Schema keywords that constrain values but that llama.cpp's converter does not turn into
# grammar rules: a schema using them is refused, not enforced halfway.
_UNENFORCEABLE = ("multipleOf", "not", "if", "then", "else", "dependentRequired",
                  "dependentSchemas", "minProperties", "maxProperties", "patternProperties",
                  "contains", "minContains", "maxContains", "propertyNames",
                  "unevaluatedProperties", "unevaluatedItems")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMAS = ("items", "additionalProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAX_DIGITS = 16  # the converter's own integers have at most 16 digits


def _digits_range(a: str, b: str) -> list[str]:
    """GBNF alternatives for the digit strings of one length from ``a`` to ``b`` (equal
    lengths, leading zeros allowed: positions inside a longer number)."""
    if a == b:
        return [f'"{a}"']
    if len(a) == 1:
        return [f"[{a}-{b}]"]
    rest = len(a) - 1
    if a[1:] == "0" * rest and b[1:] == "9" * rest:
        return [f"[{a[0]}-{b[0]}] [0-9]{{{rest}}}"]
    if a[0] == b[0]:
        return [f'"{a[0]}" ( {" | ".join(_digits_range(a[1:], b[1:]))} )']
    out = [f'"{a[0]}" ( {" | ".join(_digits_range(a[1:], "9" * rest))} )']
    if int(b[0]) - int(a[0]) > 1:
        out.append(f"[{int(a[0]) + 1}-{int(b[0]) - 1}] [0-9]{{{rest}}}")
    out.append(f'"{b[0]}" ( {" | ".join(_digits_range("0" * rest, b[1:]))} )')
    return out


def _natural_range(lo: int, hi: int | None) -> list[str]:
    """GBNF alternatives for the integers ``lo..hi`` (0 <= lo; hi None: no upper bound up
    to 16 digits), written without leading zeros."""
    out = []
    top = hi if hi is not None else 10 ** _MAX_DIGITS - 1
    while lo <= top:
        width = len(str(lo))
        end = min(top, 10 ** width - 1)
        if hi is None and end == 10 ** width - 1 and str(lo) == "1" + "0" * (width - 1):
            out.append(f"[1-9] [0-9]{{{width - 1},{_MAX_DIGITS - 1}}}" if width > 1
                       else f"[1-9] [0-9]{{0,{_MAX_DIGITS - 1}}}")
            break
        out += _digits_range(str(lo), str(end))
        lo = end + 1
    return out


def integer_range(lo: int | None, hi: int | None) -> str:
    """A GBNF expression for the JSON integers from ``lo`` to ``hi`` (None: unbounded)."""
    alts = []
    if lo is None or lo < 0:  # the negative part: "-" then the absolute value
        neg_hi = None if lo is None else -lo
        neg_lo = 1 if hi is None or hi >= 0 else -hi
        if neg_hi is None or neg_lo <= neg_hi:
            alts.append(f'"-" ( {" | ".join(_natural_range(neg_lo, neg_hi))} )')
    if hi is None or hi >= 0:
        alts += _natural_range(max(lo or 0, 0), hi)
    if not alts:
        raise ValueError("the range is empty")
    return "( " + " | ".join(alts) + " )"


def _prepare_schema(schema, path: str, ranges: dict) -> None:
    """Check ``schema`` (in place, a private copy) for keywords a grammar cannot enforce
    (400 naming the keyword's path), and swap each bounded integer for a placeholder
    constant that :func:`schema_grammar` replaces with :func:`integer_range`'s rule."""
    stack = [(schema, path)]
    while stack:
        node, where = stack.pop()
        if not isinstance(node, dict):
            continue
        for key in _UNENFORCEABLE:
            if key in node:
                raise RequestError(400, f"'{where}.{key}': this JSON Schema keyword cannot be "
                                        "enforced with a llama.cpp grammar", param=where)
        if node.get("uniqueItems") is True:
            raise RequestError(400, f"'{where}.uniqueItems': cannot be enforced with a "
                                    "llama.cpp grammar", param=where)
        if any(k in node for k in _BOUNDS):
            _bounded(node, where, ranges)
        for key in _SUBSCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack.extend((v, f"{where}.{key}.{k}") for k, v in node[key].items())
        for key in _SUBSCHEMAS:
            if isinstance(node.get(key), dict):
                stack.append((node[key], f"{where}.{key}"))
        for key in _SUBSCHEMA_LISTS:
            if isinstance(node.get(key), list):
                stack.extend((v, f"{where}.{key}[{i}]") for i, v in enumerate(node[key]))


def _bounded(node: dict, where: str, ranges: dict) -> None:
    bounds = {k: node[k] for k in _BOUNDS if k in node}
    if node.get("type") != "integer" or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds.values()):
        raise RequestError(400, f"'{where}': numeric bounds can be enforced only on "
                                "\"type\": \"integer\" (use an integer or an enum)",
                           param=where)
    import math

    lo = hi = None
    if "minimum" in bounds:
        lo = math.ceil(bounds["minimum"])
    if "exclusiveMinimum" in bounds:
        lo = max(lo if lo is not None else -math.inf, math.floor(bounds["exclusiveMinimum"]) + 1)
    if "maximum" in bounds:
        hi = math.floor(bounds["maximum"])
    if "exclusiveMaximum" in bounds:
        hi = min(hi if hi is not None else math.inf, math.ceil(bounds["exclusiveMaximum"]) - 1)
    limit = 10 ** _MAX_DIGITS - 1
    if (lo is not None and abs(lo) > limit) or (hi is not None and abs(hi) > limit) or \
            (lo is not None and hi is not None and lo > hi):
        raise RequestError(400, f"'{where}': integer bounds must be an interval of "
                                f"integers of at most {_MAX_DIGITS} digits", param=where)
    token = f"__edge_tune_integer_{len(ranges)}__"
    ranges[token] = integer_range(lo, hi)
    kept = {k: v for k, v in node.items() if k in ("description", "title")}
    node.clear()
    node.update(kept, const=token)


def _visit(converter, schema, name: str, field: str, ranges: dict) -> str:
    """Add ``schema``'s rules to ``converter`` under rule ``name``; returns the rule name.
    Bounded integers go into ``ranges`` (placeholder -> GBNF), see :func:`_finish`."""
    if not isinstance(schema, dict):
        raise RequestError(400, f"'{field}': expected a JSON Schema object", param=field)
    try:
        # both walks change the schema in place: work on a copy the request does not share
        schema = json.loads(json.dumps(schema))
        _prepare_schema(schema, field, ranges)
        resolved = converter.resolve_refs(schema, "request")
        return converter.visit(resolved, name)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError(400, f"'{field}': the schema is nested too deeply",
                           param=field) from None
    except Exception as exc:  # noqa: BLE001 -- the converter raises bare errors on schemas it
        # cannot express (remote $ref, unsupported keyword combinations, bad patterns)
        said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RequestError(400, f"'{field}': this JSON Schema cannot be enforced with a "
                                f"llama.cpp grammar ({said[:200]})", param=field) from None


def schema_grammar(schema: dict, field: str) -> str:
    """GBNF text whose every match is a JSON document valid against ``schema`` (for the
    keywords llama.cpp's converter supports: types, properties/required,
    additionalProperties, items, enum/const, anyOf/oneOf/allOf, $ref/$defs, string
    min/maxLength, patterns, integer bounds...). ``field`` names the schema in errors."""
    from edge_tune.llama.gbnf import schema_converter

    converter, ranges = schema_converter(), {}
    _visit(converter, schema, "", field, ranges)
    return _finish(converter.format_grammar(), ranges)


def _finish(gbnf: str, ranges: dict) -> str:
    """Put each bounded integer's rule where its placeholder constant is."""
    from edge_tune.llama.gbnf import literal

    for token, rule in ranges.items():
        gbnf = gbnf.replace(literal(json.dumps(token)), rule)
    return gbnf


def any_json_grammar() -> str:
    """llama.cpp's ``json.gbnf``: any JSON object."""
    from edge_tune.llama.gbnf import any_json

    return any_json()


def response_format_grammar(value) -> str | None:
    """GBNF for OpenAI's ``response_format`` (None: plain text). Shapes:
    ``{"type": "text"}``, ``{"type": "json_object"}``, ``{"type": "json_schema",
    "json_schema": {"name", "schema", "strict"?, "description"?}}``."""
    field = "response_format"
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object",
                                                               "json_schema"):
        raise RequestError(400, f"'{field}': expected {{\"type\": \"text\" | \"json_object\" | "
                                "\"json_schema\"}", param=field)
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return any_json_grammar()
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise RequestError(400, f"'{field}.json_schema': expected an object with 'name' and "
                                "'schema'", param=f"{field}.json_schema")
    schema = spec.get("schema")
    if schema is None:  # OpenAI: no schema means any JSON object
        return any_json_grammar()
    return schema_grammar(schema, f"{field}.json_schema.schema")


def tool_call_grammar(tools: list[dict], names: list[str], syntax) -> str:
    """GBNF for exactly one call, in the template's ``syntax``
    (:class:`edge_tune.server.tools.CallSyntax`), to one of the functions ``names``: the
    call object is ``{"name": NAME, ARGS_KEY: <the function's parameters schema>}`` between
    the syntax's opening and closing text."""
    from edge_tune.llama.gbnf import literal, schema_converter

    converter, ranges = schema_converter(), {}
    by_name = {t["function"]["name"]: (i, t["function"]) for i, t in enumerate(tools)}
    alternatives = []
    for n, name in enumerate(names):
        i, fn = by_name[name]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        rule = _visit(converter, params, f"args{n}", f"tools[{i}].function.parameters",
                      ranges)
        head = literal(json.dumps({"name": name}, ensure_ascii=False)[:-1])
        key = literal(f', "{syntax.args_key}": ')
        alternatives.append(f"{head} {key} {rule} \"}}\"")
    body = " | ".join(f"( {a} )" for a in alternatives)
    parts = [literal(syntax.open)] if syntax.open else []
    parts.append(f"( {body} )")
    if syntax.close:
        parts.append(literal(syntax.close))
    return _finish(f"root ::= {' '.join(parts)}\n{converter.format_grammar()}",
                   ranges)


def compiled(gbnf: str, engine, field: str):
    """``gbnf`` parsed by llama.cpp against ``engine``'s vocabulary, as the request's
    ``grammar`` sampling argument; a grammar llama.cpp refuses is a 400 naming ``field``."""
    from edge_tune.llama.gbnf import GrammarRefused

    try:
        return engine.grammar(gbnf)
    except GrammarRefused:
        raise RequestError(400, f"'{field}': llama.cpp could not build a grammar from it",
                           param=field) from None
