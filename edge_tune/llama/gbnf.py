"""llama.cpp grammars (GBNF): llama-cpp-python's JSON Schema converter, llama.cpp's
``json.gbnf``, and the parse check a grammar passes before it reaches a sampler.

The converter is llama-cpp-python's port of llama.cpp's ``json_schema_to_grammar.py``
(``llama_cpp.llama_grammar.SchemaConverter``); what a request may ask of it is decided by the
server (:mod:`edge_tune.server.grammar`).
"""

from __future__ import annotations

from edge_tune.errors import GrammarRefused
from edge_tune.native_log import quiet_stderr


def schema_converter():
    """A fresh ``SchemaConverter`` (no property order, no remote ``$ref``, ``.`` not matching
    newlines, patterns as regular expressions): ``resolve_refs(schema, url)``,
    ``visit(schema, rule_name)``, ``format_grammar()``."""
    from llama_cpp.llama_grammar import SchemaConverter

    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def literal(text: str) -> str:
    """``text`` as a GBNF string literal, escaped as the converter escapes its own literals
    (its escape table: ``\\r``, ``\\n``, ``\\"``)."""
    from llama_cpp.llama_grammar import GRAMMAR_LITERAL_ESCAPE_RE, GRAMMAR_LITERAL_ESCAPES

    escaped = GRAMMAR_LITERAL_ESCAPE_RE.sub(lambda m: GRAMMAR_LITERAL_ESCAPES[m.group(0)], text)
    return f'"{escaped}"'


def any_json() -> str:
    """llama.cpp's ``json.gbnf``: any JSON object."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def compile_grammar(gbnf: str, vocab):
    """``gbnf`` (root rule ``root``) as a ``LlamaGrammar`` for llama-cpp-python's ``grammar``
    sampling argument, once llama.cpp has parsed it against ``vocab`` (a ``llama_vocab``
    pointer): llama-cpp-python adds a grammar sampler without checking it, and a grammar
    llama.cpp refuses would reach the sampler chain as a NULL pointer. Raises
    :class:`GrammarRefused`."""
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar

    with quiet_stderr():
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
    if not sampler:
        raise GrammarRefused("llama.cpp could not build a grammar from it")
    llama_cpp.llama_sampler_free(sampler)
    return LlamaGrammar.from_string(gbnf, verbose=False)
