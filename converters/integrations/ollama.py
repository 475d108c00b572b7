"""A model's Jinja chat template -> an Ollama ``TEMPLATE`` (Go text/template), and Modelfiles.

Jinja templates are programs; a general translation is impossible. What Ollama needs is the
text each role is wrapped in, so the template is *measured*, not parsed: it is rendered with
sentinel contents for a few conversations and the role prefixes/suffixes, the generation
prompt and any default system block are read off the differences. The Go template built from
those parts is then checked against the Jinja template on a multi-turn conversation. Three
shapes are known: role blocks (ChatML, Llama-3, ...), role blocks whose system prompt opens
the first user turn (Gemma), and role blocks whose system prompt opens the user turn that is
the last message (Mistral v0.3: so only an inference prompt carries it); anything else is
reported as untranslatable instead of being guessed at.

Trimming: Llama-3, Gemma and Mistral ``| trim`` message contents. Ollama's Go templates cannot
(text/template has no string functions and Ollama adds only ``json``), so the roles whose
contents the template trims are measured too and reported: the Go template renders the same
text for contents without surrounding whitespace, which is what chat front ends send.

BOS is left out (rendered as ""): llama.cpp and Ollama add it from the GGUF's tokenizer flags.
Pure: no I/O (jinja2 is only used to render).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

S, U1, A1, U2, A2 = "SYSPROBE", "USERPROBE1", "ASSTPROBE1", "USERPROBE2", "ASSTPROBE2"


class Untranslatable(ValueError):
    """The template is not a sequence of role blocks."""


@dataclass(frozen=True)
class RoleBlocks:
    head: str  # emitted when the conversation has no system message (a default system block)
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str  # the generation prompt
    fold_sep: str | None = None  # system text + fold_sep opens a user turn (Gemma, Mistral)
    fold_last: bool = False  # ... the last message (Mistral), not the first user turn (Gemma)
    trims: frozenset = frozenset()  # roles whose contents the Jinja template strips

    def folds_into(self, i: int, messages: list[dict]) -> bool:
        """Whether message ``i`` opens with the system prompt."""
        if self.fold_sep is None or not messages or messages[0]["role"] != "system":
            return False
        target = len(messages) - 1 if self.fold_last else 1
        return i == target and messages[i]["role"] == "user"

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               trim: bool = True) -> str:
        """What the Jinja template renders, in Python; ``trim=False``: what the Go template
        renders (it cannot strip contents)."""
        has_system = bool(messages) and messages[0]["role"] == "system"
        out = "" if has_system else self.head
        strip = (lambda role, text: text.strip() if trim and role in self.trims else text)
        for i, m in enumerate(messages):
            if self.fold_sep is not None and m["role"] == "system":
                continue
            pre, post = getattr(self, m["role"])
            if self.folds_into(i, messages):
                pre += strip("system", messages[0]["content"]) + self.fold_sep
            out += pre + strip(m["role"], m["content"]) + post
        return out + (self.generation if add_generation_prompt else "")


def jinja_renderer(template: str, eos_token: str = ""):
    """render(messages, add_generation_prompt) with a template, as transformers does (sandboxed
    Jinja, trim_blocks/lstrip_blocks), BOS as ""."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)

    def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token="", eos_token=eos_token)

    return render


def _split(text: str, needle: str, what: str) -> tuple[str, str]:
    if text.count(needle) != 1:
        raise Untranslatable(f"cannot locate the {what} in the rendered template")
    i = text.index(needle)
    return text[:i], text[i + len(needle):]


def _after(longer: str, shorter: str, what: str) -> str:
    if not longer.startswith(shorter):
        raise Untranslatable(f"the template does not render {what} incrementally")
    return longer[len(shorter):]


def _without_closing_eos(render, eos_token: str):
    """``render`` without the EOS some templates append to a conversation rendered with no
    generation prompt (Phi-3: ``{% else %}{{ eos_token }}``). Inference prompts always end in
    the generation prompt, so that EOS is never part of what Ollama renders."""
    def wrapped(messages: list[dict], add_generation_prompt: bool = False) -> str:
        out = render(messages, add_generation_prompt)
        if not add_generation_prompt and out.endswith(eos_token):
            out = out[: -len(eos_token)]
        return out

    return wrapped


def measure(render, eos_token: str = "") -> RoleBlocks:
    """Read the role blocks off a ``render(messages, add_generation_prompt)`` function.

    Besides plain role blocks this reads three quirks of real templates: an EOS closing a
    rendering without generation prompt (Phi-3), no system role at all (Gemma 2 raises: the
    system prompt is folded into the first user turn, as ``--system-mode fold`` does), and an
    assistant turn rendered differently once a user turn follows it (Qwen3 drops the empty
    ``<think></think>`` it adds to the last answer): the blocks are then read from answers in
    history, which is where an inference prompt has them."""
    msg = lambda role, content: {"role": role, "content": content}
    from jinja2.exceptions import TemplateError

    def probe(messages, gen):
        try:
            return render(messages, gen)
        except TemplateError as exc:
            raise Untranslatable(f"the template refused a probe conversation ({exc})") from None

    if eos_token:
        r1, g1 = probe([msg("user", U1)], False), probe([msg("user", U1)], True)
        if not g1.startswith(r1) and r1.endswith(eos_token) and \
                g1.startswith(r1[: -len(eos_token)]):
            render = _without_closing_eos(render, eos_token)
    r1 = probe([msg("user", U1)], False)
    r2 = probe([msg("user", U1), msg("assistant", A1)], False)
    r3 = probe([msg("user", U1), msg("assistant", A1), msg("user", U2)], False)
    g1 = probe([msg("user", U1)], True)
    try:
        rs = render([msg("system", S), msg("user", U1)], False)
    except TemplateError:
        rs = None  # no system role: folded into the first user turn below
    generation = _after(g1, r1, "the generation prompt")
    turn_then_user = _after(r3, r1, "a user turn")
    pre, rest = _split(turn_then_user, A1, "assistant content")
    post = _split(_after(r2, r1, "an assistant turn"), A1, "assistant content")[1]
    if not rest.startswith(post):
        raise Untranslatable("cannot tell where an assistant turn ends")
    assistant = (pre, post)
    user = _split(rest[len(post):], U2, "user content")
    tail = user[0] + U1 + user[1]
    if not r1.endswith(tail):
        raise Untranslatable("the first user turn is rendered differently from later ones")
    head = r1[: -len(tail)]
    check = [msg("system", "Be brief."), msg("user", "Hi!"), msg("assistant", "Hello."),
             msg("user", "What is 2+2?"), msg("assistant", "4"), msg("user", "Thanks")]
    jinja = render
    if rs is None:
        from edge_tune.data.template import fold_system

        candidates = [RoleBlocks(head, ("", ""), user, assistant, generation, "\n\n")]
        jinja = lambda conv, gen: render(fold_system(conv), gen)  # noqa: E731
    elif rs.endswith(tail):
        candidates = [RoleBlocks(head, _split(rs[: -len(tail)], S, "system content"), user,
                                 assistant, generation)]
    elif not head and rs.startswith(user[0] + S) and rs.endswith(U1 + user[1]):
        # The system prompt opens a user turn: the first (Gemma) or the last message's
        # (Mistral); a one-turn probe cannot tell which, the multi-turn check does.
        sep = rs[len(user[0] + S): -len(U1 + user[1])]
        candidates = [RoleBlocks(head, ("", ""), user, assistant, generation, sep, last)
                      for last in (False, True)]
    else:
        raise Untranslatable("the system prompt is placed in a way other than its own turn or "
                             "the start of a user turn")
    for blocks in candidates:
        if all(blocks.render(conv) == jinja(conv, True) for conv in (check, check[1:])):
            return replace(blocks, trims=_trimmed_roles(blocks, jinja, check))
    raise Untranslatable("the template is not a plain sequence of role blocks")


def _trimmed_roles(blocks: RoleBlocks, render, probe: list[dict]) -> frozenset:
    """The roles whose contents the template strips: pad one role's contents with whitespace
    and see whether the rendering keeps it."""
    trims = set()
    for role in ("system", "user", "assistant"):
        padded = [dict(m, content=f" \n{m['content']}\n ") if m["role"] == role else m
                  for m in probe]
        got = render(padded, True)
        if got != blocks.render(padded) and \
                got == replace(blocks, trims=frozenset({role})).render(padded):
            trims.add(role)
    return frozenset(trims)


def _literal(text: str) -> str:
    # Text outside {{ }} is copied verbatim by Go; only "{{" itself needs quoting.
    return text.replace("{{", '{{"{{"}}')


def go_template(blocks: RoleBlocks) -> str:
    """The Ollama TEMPLATE: one line, no ``{{-`` trim markers (they would eat the newlines the
    role blocks end with). ``and`` short-circuits in Go >= 1.18, so ``index`` is safe."""
    L = _literal
    first_is_system = '(and .Messages (eq (index .Messages 0).Role "system"))'
    out = ""
    if blocks.head:
        out += f"{{{{ if not {first_is_system} }}}}{L(blocks.head)}{{{{ end }}}}"
    out += "{{ range $i, $m := .Messages }}"
    roles = ("user", "assistant") if blocks.fold_sep is not None else \
        ("system", "user", "assistant")
    # Mistral: "is $i the last message" is "does slicing from $i leave one".
    target = "(eq (len (slice $.Messages $i)) 1)" if blocks.fold_last else "(eq $i 1)"
    for i, role in enumerate(roles):
        pre, post = getattr(blocks, role)
        out += f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{L(pre)}'
        if role == "user" and blocks.fold_sep is not None:
            out += (f'{{{{ if and {target} (eq (index $.Messages 0).Role "system") }}}}'
                    f"{{{{ (index $.Messages 0).Content }}}}{L(blocks.fold_sep)}{{{{ end }}}}")
        out += f"{{{{ .Content }}}}{L(post)}"
    out += "{{ end }}{{ end }}" + L(blocks.generation)
    return out


def translate(template: str, eos_token: str = "") -> tuple[str, RoleBlocks]:
    """(Go template, role blocks) for a Jinja chat template; raises Untranslatable."""
    blocks = measure(jinja_renderer(template, eos_token), eos_token)
    return go_template(blocks), blocks


def stop_words(blocks: RoleBlocks | None, eos_token: str | None) -> list[str]:
    """Ollama ``stop`` parameters: the end-of-turn marker the template closes answers with,
    and the EOS token."""
    out = []
    if blocks is not None and blocks.assistant[1].strip():
        out.append(blocks.assistant[1].strip())
    if eos_token and eos_token not in out:
        out.append(eos_token)
    return out


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError('text contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def trim_note(blocks: RoleBlocks | None) -> str | None:
    """What a Modelfile reader should know when the Jinja template strips contents."""
    if blocks is None or not blocks.trims:
        return None
    roles = ", ".join(r for r in ("system", "user", "assistant") if r in blocks.trims)
    return (f"the chat template strips whitespace around {roles} messages; Ollama templates "
            "cannot, so send them without leading/trailing whitespace")


@dataclass(frozen=True)
class Builtin:
    """Ollama's own prompt renderer and output parser for a family (``renderer`` None: Ollama
    has only a parser for it, and the Modelfile's TEMPLATE still renders the prompt)."""

    family: str
    renderer: str | None
    parser: str


# Ollama >= 0.12 Modelfiles take ``RENDERER NAME`` and ``PARSER NAME`` (``parser/parser.go``
# of ollama/ollama): the renderer builds the prompt with tools and thinking in Go code, the
# parser splits the output into content, thinking and tool calls. The names are the ones
# ollama/ollama accepts (``model/renderers/renderer.go`` ``rendererForName``,
# ``model/parsers/parsers.go`` ``ParserForName``, read at fb30760, Aug 2026): a name it does not
# know fails every chat request ("unknown renderer"), so nothing is guessed here. Llama 3.x has
# neither: Ollama calls its tools through the TEMPLATE alone.
_QWEN3 = ("qwen3", "qwen3moe")


def builtin(arch: str, template: str) -> Builtin | None:
    """Ollama's built-in renderer/parser for a GGUF's ``general.architecture`` and its chat
    template's text, or None. Pure."""
    t = template or ""
    if "<start_function_call>" in t:
        return Builtin("FunctionGemma", "functiongemma", "functiongemma")
    if arch in _QWEN3 and "<function=" in t:
        return Builtin("Qwen3-Coder", "qwen3-coder", "qwen3-coder")
    if arch in _QWEN3 and "<tool_call>" in t:
        return Builtin("Qwen3", None, "qwen3-thinking" if "<think>" in t else "qwen3")
    if arch in ("qwen35", "qwen35moe"):
        return Builtin("Qwen3.5", "qwen3.5", "qwen3.5")
    if arch == "gpt-oss":
        return Builtin("gpt-oss (harmony)", None, "harmony")
    if arch in ("lfm2", "lfm2moe"):
        name = "lfm2-thinking" if "<think>" in t else "lfm2"
        return Builtin("LFM2", name, name)
    if arch == "deepseek2" and "</think>" in t and "Assistant" in t:
        return Builtin("DeepSeek-V3.1", "deepseek3.1", "deepseek3")
    return None


def builtin_note(b: Builtin | None) -> str | None:
    """What a Modelfile reader should know about ``b``: without a renderer, the translated
    TEMPLATE renders the prompt, and it has no tool definitions."""
    if b is None or b.renderer is not None:
        return None
    return (f"Ollama has a {b.family} parser ({b.parser}) but no renderer: the TEMPLATE below "
            "renders the prompt and carries no tool definitions (thinking and tool calls in "
            "the output are parsed); needs Ollama >= 0.12")


def modelfile(from_: str, adapter: str | None, template: str | None, stops: list[str],
              system: str | None = None, note: str = "", notes: tuple[str, ...] = (),
              handlers: Builtin | None = None) -> str:
    """The Modelfile text; paths are written as given (relative to the Modelfile).
    ``handlers``: RENDERER / PARSER lines (the TEMPLATE stays, for what they do not cover)."""
    lines = [f"# {note}" if note else "# written by edge-tune"]
    lines += [f"# note: {n}" for n in notes]
    lines.append(f"FROM {from_}")
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if handlers is not None and handlers.renderer:
        lines.append(f"RENDERER {handlers.renderer}")
    if handlers is not None:
        lines.append(f"PARSER {handlers.parser}")
    if template is not None:
        lines.append(f"TEMPLATE {_quote(template)}")
    for stop in stops:
        lines.append(f'PARAMETER stop "{stop}"')
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    return "\n".join(lines) + "\n"
