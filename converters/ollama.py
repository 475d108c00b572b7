"""A model's Jinja chat template -> an Ollama ``TEMPLATE`` (Go text/template), and Modelfiles.

Jinja templates are programs; a general translation is impossible. What Ollama needs is the
text each role is wrapped in, so the template is *measured*, not parsed: it is rendered with
sentinel contents for a few conversations and the role prefixes/suffixes, the generation
prompt and any default system block are read off the differences. The Go template built from
those parts is then checked against the Jinja template on a multi-turn conversation. Two
shapes are known: role blocks (ChatML, Llama-3, ...) and role blocks whose system prompt opens
the first user turn (Gemma); anything else (Mistral folds it into the *last* user turn) is
reported as untranslatable instead of being guessed at.

BOS is left out (rendered as ""): llama.cpp and Ollama add it from the GGUF's tokenizer flags.
Pure: no I/O (jinja2 is only used to render).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    fold_sep: str | None = None  # Gemma: system text + fold_sep opens the first user turn

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """What the Go template renders, in Python (used for the self-check)."""
        has_system = bool(messages) and messages[0]["role"] == "system"
        out = "" if has_system else self.head
        for i, m in enumerate(messages):
            if self.fold_sep is not None and m["role"] == "system":
                continue
            pre, post = getattr(self, m["role"])
            if self.fold_sep is not None and i == 1 and has_system:
                pre += messages[0]["content"] + self.fold_sep
            out += pre + m["content"] + post
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


def measure(render) -> RoleBlocks:
    """Read the role blocks off a ``render(messages, add_generation_prompt)`` function."""
    msg = lambda role, content: {"role": role, "content": content}
    from jinja2.exceptions import TemplateError

    try:
        r1 = render([msg("user", U1)], False)
        r2 = render([msg("user", U1), msg("assistant", A1)], False)
        r3 = render([msg("user", U1), msg("assistant", A1), msg("user", U2)], False)
        g1 = render([msg("user", U1)], True)
        rs = render([msg("system", S), msg("user", U1)], False)
    except TemplateError as exc:
        raise Untranslatable(f"the template refused a probe conversation ({exc})") from None
    generation = _after(g1, r1, "the generation prompt")
    assistant = _split(_after(r2, r1, "an assistant turn"), A1, "assistant content")
    user = _split(_after(r3, r2, "a user turn"), U2, "user content")
    tail = user[0] + U1 + user[1]
    if not r1.endswith(tail):
        raise Untranslatable("the first user turn is rendered differently from later ones")
    head = r1[: -len(tail)]
    fold_sep = None
    if rs.endswith(tail):
        system = _split(rs[: -len(tail)], S, "system content")
    elif not head and rs.startswith(user[0] + S) and rs.endswith(U1 + user[1]):
        # The system prompt opens the first user turn (Gemma).
        fold_sep = rs[len(user[0] + S): -len(U1 + user[1])]
        system = ("", "")
    else:
        raise Untranslatable("the system prompt is placed in a way other than its own turn or "
                             "the start of the first user turn")
    blocks = RoleBlocks(head, system, user, assistant, generation, fold_sep)
    probe = [msg("system", "Be brief."), msg("user", "Hi!"), msg("assistant", "Hello."),
             msg("user", "What is 2+2?"), msg("assistant", "4"), msg("user", "Thanks")]
    for conv in (probe, probe[1:]):
        if blocks.render(conv) != render(conv, True):
            raise Untranslatable("the template is not a plain sequence of role blocks")
    return blocks


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
    for i, role in enumerate(roles):
        pre, post = getattr(blocks, role)
        out += f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{L(pre)}'
        if role == "user" and blocks.fold_sep is not None:
            out += ('{{ if and (eq $i 1) (eq (index $.Messages 0).Role "system") }}'
                    f"{{{{ (index $.Messages 0).Content }}}}{L(blocks.fold_sep)}{{{{ end }}}}")
        out += f"{{{{ .Content }}}}{L(post)}"
    out += "{{ end }}{{ end }}" + L(blocks.generation)
    return out


def translate(template: str, eos_token: str = "") -> tuple[str, RoleBlocks]:
    """(Go template, role blocks) for a Jinja chat template; raises Untranslatable."""
    blocks = measure(jinja_renderer(template, eos_token))
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


def modelfile(from_: str, adapter: str | None, template: str | None, stops: list[str],
              system: str | None = None, note: str = "") -> str:
    """The Modelfile text; paths are written as given (relative to the Modelfile)."""
    lines = [f"# {note}" if note else "# written by edge-tune", f"FROM {from_}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if template is not None:
        lines.append(f"TEMPLATE {_quote(template)}")
    for stop in stops:
        lines.append(f'PARAMETER stop "{stop}"')
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    return "\n".join(lines) + "\n"
