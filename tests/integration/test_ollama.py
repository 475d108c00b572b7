"""Ollama Modelfile: the Go TEMPLATE renders exactly the text the Jinja chat template renders.

No Go toolchain is at hand, so the Go side is rendered by a small interpreter of the
text/template subset the translator emits (literal text, ``if/else if/else/end``, ``range``,
``eq``, ``not``, ``and`` with Go's short-circuit, ``index``, field access, string literals).
It refuses anything else, so the translator cannot silently emit syntax it does not check.
"""

from __future__ import annotations

import re

import pytest

from tests.helpers.cli import run_cli
from edge_tune.converters.integrations import ollama
from tests.helpers.chat_templates import CHATML, GEMMA, LLAMA3, MISTRAL

# --- a tiny Go text/template interpreter (the emitted subset) ----------------------------

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)


def _tokens(template: str):
    pos = 0
    for m in _ACTION.finditer(template):
        yield ("text", template[pos:m.start()])
        assert not m.group(1) and not m.group(3), "trim markers are not emitted"
        yield ("action", m.group(2))
        pos = m.end()
    yield ("text", template[pos:])


def _parse(tokens, stop=("end",)):
    """-> (nodes, the keyword that ended the list)."""
    nodes = []
    for kind, value in tokens:
        if kind == "text":
            nodes.append(("text", value))
        elif value in stop or value.startswith("else"):
            return nodes, value
        elif value.startswith("if "):
            branches, cond = [], value[3:]
            while True:
                body, ended = _parse(tokens)
                branches.append((cond, body))
                if ended == "end":
                    break
                cond = ended[len("else if "):] if ended.startswith("else if ") else "true"
            nodes.append(("if", branches))
        elif value.startswith("range "):
            body, ended = _parse(tokens)
            assert ended == "end"
            m = re.fullmatch(r"range (?:(\$\w+), (\$\w+) := )?(.+)", value)
            nodes.append(("range", m.group(3), body, m.group(1), m.group(2)))
        else:
            nodes.append(("expr", value))
    return nodes, None


def _split_args(expr: str) -> list[str]:
    out, depth, cur, quoted = [], 0, "", False
    for ch in expr:
        if ch == '"' and depth == 0:
            quoted = not quoted
        if ch == " " and depth == 0 and not quoted:
            if cur:
                out.append(cur)
            cur = ""
            continue
        depth += (ch == "(") - (ch == ")")
        cur += ch
    return out + ([cur] if cur else [])


def _eval(expr: str, dot, root, env=None):
    expr = expr.strip()
    env = env or {}
    if expr == "true":
        return True
    if expr.isdigit():
        return int(expr)
    if expr.startswith("$."):
        return _eval(expr[1:], root, root, env)
    if expr.startswith("$"):
        return env[expr]
    if expr.startswith('"'):
        assert expr.endswith('"')
        return expr[1:-1]
    m = re.fullmatch(r"\((.*)\)(\.\w+)?", expr, re.DOTALL)
    if m:
        value = _eval(m.group(1), dot, root, env)
        return value[m.group(2)[1:].lower()] if m.group(2) else value
    if expr.startswith("."):
        value = dot
        for part in expr[1:].split("."):
            value = value[part.lower()]
        return value
    fn, *args = _split_args(expr)
    return _call(fn, args, lambda a: _eval(a, dot, root, env), expr)


def _call(fn: str, args: list[str], ev, expr: str):
    """A Go template function call ``fn args...``, the arguments evaluated by ``ev``."""
    if fn == "eq":
        return ev(args[0]) == ev(args[1])
    if fn == "not":
        return not ev(args[0])
    if fn == "and":  # short-circuit, returns the first falsy argument or the last
        for a in args:
            value = ev(a)
            if not value:
                return value
        return value
    if fn == "index":
        return ev(args[0])[ev(args[1])]
    if fn == "len":
        return len(ev(args[0]))
    if fn == "slice":
        return ev(args[0])[ev(args[1]):]
    raise AssertionError(f"unsupported Go template expression: {expr!r}")


def _run(nodes, dot, root, env=None) -> str:
    out, env = "", env or {}
    for node in nodes:
        if node[0] == "text":
            out += node[1]
        elif node[0] == "expr":
            out += str(_eval(node[1], dot, root, env))
        elif node[0] == "if":
            for cond, body in node[1]:
                if _eval(cond, dot, root, env):
                    out += _run(body, dot, root, env)
                    break
        elif node[0] == "range":
            _, expr, body, i_var, v_var = node
            for i, item in enumerate(_eval(expr, dot, root, env)):
                out += _run(body, item, root, {**env, i_var: i, v_var: item})
    return out


def go_render(template: str, messages: list[dict], system: str = "") -> str:
    nodes, ended = _parse(iter(list(_tokens(template))))
    assert ended is None
    data = {"messages": messages, "system": system}
    return _run(nodes, data, data)


# --- the tests ----------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You answer like a pirate."},
    {"role": "user", "content": "Where is the treasure?"},
    {"role": "assistant", "content": "Arr, under the palm tree.\nDig deep!"},
    {"role": "user", "content": "How deep? Use {{braces}} too."},
    {"role": "assistant", "content": "Ten paces, matey."},
    {"role": "user", "content": "Thanks!"},
]


FAMILIES = [("chatml-smollm2", CHATML), ("llama3", LLAMA3), ("gemma", GEMMA),
            ("mistral", MISTRAL)]


@pytest.mark.parametrize("name,template", FAMILIES)
@pytest.mark.parametrize("with_system", [True, False])
def test_go_template_renders_like_jinja(name, template, with_system):
    conv = CONVERSATION if with_system else CONVERSATION[1:]
    go, _ = ollama.translate(template)
    want = ollama.jinja_renderer(template)(conv, True)
    assert go_render(go, conv) == want
    assert "Dig deep!" in want and "{{braces}}" in want
    # An inference prompt (ends with a user turn) and a conversation ending with an answer.
    for part in (conv[:-2], conv[:-1]):
        assert go_render(go, part) == ollama.jinja_renderer(template)(part, True)


@pytest.mark.parametrize("name,template,trimmed", [
    ("chatml-smollm2", CHATML, set()), ("llama3", LLAMA3, {"system", "user", "assistant"}),
    ("gemma", GEMMA, {"user", "assistant"}), ("mistral", MISTRAL, {"assistant"})])
def test_trimming_is_measured_and_reported(name, template, trimmed):
    """Go templates cannot strip; which roles the Jinja template strips is measured exactly,
    the Python model of the template (trim=True) matches Jinja on padded contents, and the Go
    template renders what that model renders without stripping."""
    go, blocks = ollama.translate(template)
    assert set(blocks.trims) == trimmed
    padded = [dict(m, content=f"  {m['content']}\n") for m in CONVERSATION]
    assert blocks.render(padded) == ollama.jinja_renderer(template)(padded, True)
    assert go_render(go, padded) == blocks.render(padded, trim=False)
    note = ollama.trim_note(blocks)
    assert (note is None) == (not trimmed)
    if note:
        text = ollama.modelfile("./b.gguf", None, go, [], notes=(note,))
        assert text.splitlines()[1] == f"# note: {note}"
        assert all(role in note for role in trimmed)


def test_default_models_own_template(default_gguf):
    import gguf

    reader = gguf.GGUFReader(str(default_gguf))
    template = reader.fields["tokenizer.chat_template"].contents()
    go, blocks = ollama.translate(template)
    for conv in (CONVERSATION, CONVERSATION[1:]):
        assert go_render(go, conv) == ollama.jinja_renderer(template)(conv, True)
    assert ollama.stop_words(blocks, "<|im_end|>") == ["<|im_end|>"]


def test_gemma_folds_the_system_prompt_into_the_first_user_turn():
    _, blocks = ollama.translate(GEMMA)
    assert blocks.fold_sep == "\n\n" and blocks.assistant[0] == "<start_of_turn>model\n"
    assert ollama.stop_words(blocks, "<eos>") == ["<end_of_turn>", "<eos>"]


def test_mistral_folds_the_system_prompt_into_the_last_user_turn():
    go, blocks = ollama.translate(MISTRAL, "</s>")
    assert blocks.fold_sep == "\n\n" and blocks.fold_last
    assert blocks.user == ("[INST] ", "[/INST]") and blocks.assistant == (" ", "</s>")
    text = go_render(go, CONVERSATION)
    assert ollama.stop_words(blocks, "</s>") == ["</s>"]
    assert text.count("You answer like a pirate.") == 1
    assert text.endswith("[INST] You answer like a pirate.\n\nThanks![/INST]")
    # Ending with an answer, the system prompt is in no turn at all (as in the Jinja template).
    assert "pirate" not in go_render(go, CONVERSATION[:-1])


def test_a_template_that_places_the_system_prompt_elsewhere_is_refused():
    """System prompt appended to the first user turn: neither shape; reported, not guessed."""
    odd = ("{% for m in messages %}{% if m.role == 'user' %}<u>{{ m.content }}"
           "{% if loop.index0 == 1 and messages[0].role == 'system' %} ({{ messages[0].content }})"
           "{% endif %}</u>{% elif m.role == 'assistant' %}<a>{{ m.content }}</a>{% endif %}"
           "{% endfor %}{% if add_generation_prompt %}<a>{% endif %}")
    with pytest.raises(ollama.Untranslatable):
        ollama.translate(odd)


def test_modelfile_text():
    text = ollama.modelfile("./base.gguf", "./adapter.gguf", "{{ .Prompt }}", ["<|im_end|>"],
                            system="Be brief.")
    lines = text.splitlines()
    assert lines[1:] == ["FROM ./base.gguf", "ADAPTER ./adapter.gguf",
                         'TEMPLATE """{{ .Prompt }}"""', 'PARAMETER stop "<|im_end|>"',
                         'SYSTEM """Be brief."""']


def test_export_ollama_writes_modelfile_beside_its_files(default_gguf, tmp_path):
    """Through the CLI on a small hand-made adapter: Modelfile + base + adapter in DIR."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import save_file

    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    rng = np.random.default_rng(0)
    save_file({f"{pre}.lora_A.weight": rng.normal(size=(4, 576)).astype(np.float32),
               f"{pre}.lora_B.weight": rng.normal(size=(576, 4)).astype(np.float32)},
              str(peft / "adapter_model.safetensors"))
    out = tmp_path / "ollama"
    proc = run_cli("export", str(peft), "--base", str(default_gguf), "-o",
                   str(tmp_path / "a.gguf"), "--ollama", str(out))
    assert proc.returncode == 0, proc.stderr
    text = (out / "Modelfile").read_text()
    assert f"FROM ./{default_gguf.name}" in text and "ADAPTER ./a.gguf" in text
    assert (out / default_gguf.name).stat().st_size == default_gguf.stat().st_size
    assert (out / "a.gguf").is_file()
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.DOTALL).group(1)
    jinja = gguf.GGUFReader(str(default_gguf)).fields["tokenizer.chat_template"].contents()
    assert go_render(template, CONVERSATION) == ollama.jinja_renderer(jinja)(CONVERSATION, True)
    assert 'PARAMETER stop "<|im_end|>"' in text


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "gemma2", "phi3", "llama3", "gemma",
                                  "mistral", "chatml", "smollm2"])
def test_every_builtin_template_translates(name):
    """Each built-in family's template becomes a Go template that renders every inference
    prompt (the conversation ending in a user turn) exactly as the Jinja one. Phi-3 closes a
    rendering without generation prompt with EOS; Qwen3 renders the last answer with an empty
    think block, earlier ones without; Gemma 2 refuses a system message, so it is folded into
    the first user turn (--system-mode fold)."""
    from edge_tune.data.template import fold_system
    from edge_tune.templates.builtin import BUILTIN, EOS

    go, blocks = ollama.translate(BUILTIN[name], EOS.get(name, ""))
    jinja = ollama.jinja_renderer(BUILTIN[name], EOS.get(name, ""))
    for conv in (CONVERSATION[1:], CONVERSATION, CONVERSATION[:-2], CONVERSATION[1:2]):
        want = jinja(fold_system(conv) if name == "gemma2" else conv, True)
        assert go_render(go, conv) == blocks.render(conv, trim=False) == want, (name, conv)
