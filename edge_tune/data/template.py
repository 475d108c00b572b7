"""Render conversations with the model's own chat template and find the assistant tokens.

The trained spans come from the template itself, never from hand-typed role markers: for each
assistant message the conversation is rendered up to it with the generation prompt (where its
text starts: the inference prompt) and up to and including it (where its turn ends, end-of-turn
token included). Token offsets then say which tokens fall inside those character spans; a token
that would straddle a span edge is split there (see ``tokenize_spans``).

One example, or one per turn. Most templates render incrementally: each of those renders is a
prefix of the whole conversation's, and one example trains every assistant turn. Some rewrite
earlier turns as the conversation goes on: Qwen3's reasoning template drops the ``<think>``
block of assistant turns before the last user message, and writes an empty
``<think>\n\n</think>\n\n`` into a final turn that has none. The whole render then does not
show an earlier turn as the model generated it, so each trained assistant turn becomes its own
example: the conversation before it with the generation prompt as context, the turn as the
target, exactly what the model sees when it generates that turn (:func:`render_examples`).

What the template writes into the turn is trained, an inserted empty think block included: at
inference with thinking on (the template's default) the prompt ends at the generation prompt
and the model writes ``<think>...</think>`` itself; a record without reasoning teaches it to
close the block at once and answer.

OpenAI fine-tuning fields: an assistant message with ``weight: 0`` is context, not trained;
``tool_calls`` and ``tool`` results go to the template (``tool`` results are context, never
trained) and a record's ``tools`` schemas go to it as ``tools=``; tool-call arguments are
objects here (:mod:`edge_tune.data.formats` parses OpenAI's JSON strings), as Hugging Face
templates expect.

Reasoning: an assistant ``reasoning_content`` goes to the template as it is; a turn whose
reasoning the template does not render (ChatML, Qwen2.5, the default model's) is refused, never
trained as the bare answer (``--reasoning inline|drop``: :mod:`edge_tune.data.reasoning`).

Errors: a fault of one record (the template raises on it, cannot place a turn, drops its tool
calls, tools or reasoning) is a :class:`RecordError` that starts with the record's
``FILE:LINE`` and which ``--skip-invalid`` skips; a missing or broken template is an :class:`EdgeTuneError` for the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from edge_tune.errors import DataError, RecordError, UsageError

IGNORE = -100
SYSTEM_MODES = ("keep", "fold")  # what --system-mode takes (see fold_system)
NO_TEMPLATE = ("the model has no chat template, so chat records cannot be rendered: give one "
               "with --chat-template NAME|FILE (a built-in name such as chatml, llama3, qwen2, "
               "gemma, or a Jinja file), or use plain-text data")
TOOLS_HINT = ("use --chat-template qwen2|llama3 or another template that renders tool calls")
FOLD_HINT = " (to put the system text into the first user turn: --system-mode fold)"
REASONING_HINT = ("use --chat-template qwen3 (a template that renders reasoning) or "
                  "--reasoning inline (writes it into the answer between <think> and </think>), "
                  "or --reasoning drop to train the answers without it")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class Rendered:
    """One example as text: ``spans`` are the [start, end) characters that are trained."""
    text: str
    spans: list[tuple[int, int]]


# ---- messages as templates expect them ---------------------------------------------------------

def fold_system(messages: list[dict], separator: str = "\n\n") -> list[dict]:
    """The conversation with its leading system message(s) folded into the first user turn
    (``system + separator + user``, as Gemma 3's own template does), for templates that reject
    the system role (Gemma 2: "System role not supported"; Mistral v0.3 shows it only in an
    inference prompt). When no user turn comes first, the system text becomes one. Pure; a
    system message later in the conversation is left where it is. ``--system-mode fold``."""
    n = 0
    while n < len(messages) and messages[n].get("role") == "system":
        n += 1
    system = separator.join(m["content"] for m in messages[:n] if m.get("content"))
    rest = list(messages[n:])
    if not system:
        return rest
    if rest and rest[0].get("role") == "user":
        return [{**rest[0], "content": system + separator + (rest[0].get("content") or "")}] \
            + rest[1:]
    return [{"role": "user", "content": system}] + rest


def check_system_mode(system_mode: str) -> str:
    if system_mode not in SYSTEM_MODES:
        raise UsageError("expected one of "
                         f"{', '.join(SYSTEM_MODES)}",
                         setting="system_mode", value=repr(system_mode))
    return system_mode


def _for_template(messages: list[dict]) -> list[dict]:
    """``content`` always a string ("" for a tool-calling turn without text: templates
    concatenate it) and no ``weight`` (edge-tune's field, not the template's)."""
    return [{**{k: v for k, v in m.items() if k != "weight"},
             "content": "" if m.get("content") is None else m["content"]} for m in messages]


def _at(where: str, what: str) -> str:
    return f"{where}: {what}" if where else what


def _short(text: str, limit: int = 60) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
           tools: Optional[list[dict]] = None, where: str = "") -> str:
    """``tokenizer.apply_chat_template(messages, tools=tools)`` as text, with the template set
    on the tokenizer (a ``--chat-template`` override is the caller's ``tokenizer.chat_template``).

    Raises :class:`RecordError` ``WHERE: the template says: MESSAGE`` when the template raises
    on these messages (its own ``raise_exception``, e.g. Gemma's "Conversation roles must
    alternate", or an error evaluating it), and EdgeTuneError when there is no template or it
    is not valid Jinja."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(NO_TEMPLATE)
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(f"the chat template is not valid Jinja (line {exc.lineno}: "
                        f"{exc.message})") from None
    except jinja2.TemplateError as exc:
        hint = FOLD_HINT if _folding_helps(tokenizer, messages, tools) else ""
        raise RecordError(_at(where, f"the template says: {exc.message or type(exc).__name__}"
                              f"{hint}")) from None
    except (TypeError, ValueError, LookupError, AttributeError) as exc:
        # A template evaluating data it was not written for (say, None + "<|im_end|>").
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise RecordError(_at(where, f"the template fails on this record "
                              f"({type(exc).__name__}: {first})")) from None


def _folding_helps(tokenizer, messages: list[dict], tools) -> bool:
    """Whether the template renders these messages once the system text is folded into the
    first user turn: only then is ``--system-mode fold`` the advice (Mistral's alternation
    rule, Gemma 2's "System role not supported"), not for faults it cannot mend."""
    if not any(m.get("role") == "system" for m in messages):
        return False
    try:
        tokenizer.apply_chat_template(fold_system(messages), tools=tools or None, tokenize=False)
    except Exception:  # noqa: BLE001 - any failure means folding is not the way out
        return False
    return True


def _names(items: Optional[list[dict]]) -> list[str]:
    """Function names of tool schemas or tool calls (OpenAI's nested or the flat form)."""
    out = []
    for item in items or []:
        fn = item.get("function") if isinstance(item.get("function"), dict) else item
        if isinstance(fn.get("name"), str) and fn["name"]:
            out.append(fn["name"])
    return out


# ---- examples as text --------------------------------------------------------------------------

def render_examples(tokenizer, messages: list[dict], tools: Optional[list[dict]] = None, *,
                    system_mode: str = "keep", where: str = "",
                    train_on_all: bool = False) -> list[Rendered]:
    """A conversation as the examples that train it (see the module docstring): one rendered
    text with every trained assistant turn's span when the template renders incrementally,
    else one per trained turn (the conversation before it + the turn). With ``train_on_all``
    always the one whole render (its every token is trained).

    ``system_mode``: "keep", or "fold" (:func:`fold_system`). ``where``: the record's
    ``FILE:LINE``, the start of every :class:`RecordError`."""
    check_system_mode(system_mode)
    msgs = fold_system(messages) if system_mode == "fold" else list(messages)
    trained = [m.get("role") == "assistant" and m.get("weight", 1) != 0 for m in msgs]
    msgs = _for_template(msgs)
    full = render(tokenizer, msgs, False, tools, where)
    missing = [n for n in _names(tools) if n not in full]
    if missing:
        raise RecordError(_at(where, f"the chat template does not render the record's tools "
                                     f"(function {missing[0]!r} is not in the rendered text; "
                                     f"{TOOLS_HINT})"))
    turns = []  # (message index, prompt text, text up to the end of the turn)
    for nth, i in enumerate((i for i, m in enumerate(msgs) if m["role"] == "assistant"), 1):
        before = render(tokenizer, msgs[:i], True, tools, where)
        upto = render(tokenizer, msgs[: i + 1], False, tools, where)
        if not (upto.startswith(before) and len(upto) > len(before)):
            hint = FOLD_HINT if any(m["role"] == "system" for m in msgs) else ""
            raise RecordError(_at(where, f"the chat template does not render incrementally at "
                                         f"assistant turn {nth}: the conversation up to it does "
                                         f"not start with its prompt, so what to train is "
                                         f"unknown{hint}"))
        turn = upto[len(before):]
        lost = [n for n in _names(msgs[i].get("tool_calls")) if n not in turn]
        if lost:
            raise RecordError(_at(where, f"the chat template does not render tool_calls "
                                         f"(assistant turn {nth} calls {lost[0]!r} but renders "
                                         f"as {_short(turn)}; {TOOLS_HINT})"))
        reasoning = msgs[i].get("reasoning_content")
        if isinstance(reasoning, str) and reasoning.strip() and reasoning.strip() not in turn:
            raise RecordError(_at(where, f"the chat template drops assistant turn {nth}'s "
                                         f"reasoning (reasoning_content/thinking; it renders "
                                         f"the turn as "
                                         f"{_short(turn)}): {REASONING_HINT}"))
        turns.append((i, before, upto))
    if not any(trained) and not train_on_all:
        return [Rendered(full, [])]  # all context (weight 0): the trainer drops and counts it
    if all(full.startswith(upto) for _, _, upto in turns):
        return [Rendered(full, [(len(b), len(u)) for i, b, u in turns
                                if trained[i] or train_on_all])]
    if train_on_all:
        return [Rendered(full, [])]
    return [Rendered(u, [(len(b), len(u))]) for i, b, u in turns if trained[i]]


def assistant_spans(tokenizer, messages: list[dict], tools: Optional[list[dict]] = None,
                    **kw) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of every trained assistant turn,
    for a conversation that is one example; RecordError when the template rewrites earlier
    turns (then use :func:`render_examples`)."""
    out = render_examples(tokenizer, messages, tools, **kw)
    if len(out) != 1:
        raise RecordError(_at(kw.get("where", ""), "the chat template renders earlier turns "
                              "differently as the conversation goes on: one example per turn"))
    return out[0].text, out[0].spans


# ---- tokens ------------------------------------------------------------------------------------

def encode_text(tokenizer, text: str, seq_len: Optional[int] = None) -> Example:
    """Plain text for continued pre-training: loss on every token, EOS appended."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return Example(ids[:seq_len], list(ids[:seq_len]))


def tokenize_spans(tokenizer, text: str, spans: list[tuple[int, int]]
                   ) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
    """Token ids and character offsets of ``text``, and whether each token is inside a span.

    Every span edge is a token edge. BPE can merge characters across an edge: ChatML does not
    trim, so the header's "\n" and an answer's leading "  " or "\n" become one byte-level token
    ("\n " / "\n\n"); a tokenizer without a pre-tokenizer (Gemma's kind) can merge "\n" with
    the first letters. Labelling such a token trains a piece of the role header, leaving it out
    drops the answer's first characters, and the model never sees it at inference, where the
    prompt ends at the edge. So the text before the edge is tokenized as it is on its own (the
    inference prompt) and the rest of the merged token on its own.
    """
    ids, offsets = _tokenize(tokenizer, text, 0)
    added = set(getattr(tokenizer, "added_tokens_decoder", {}))  # never split these
    done = 0  # tokens before this index are final
    for x in sorted({x for span in spans for x in span}):
        i = next((t for t in range(done, len(ids)) if offsets[t][1] > x), len(ids))
        if i == len(ids) or offsets[i][0] >= x:
            done = i
            continue
        s, j, e = offsets[i][0], i, x
        while j < len(ids) and offsets[j][0] < x:  # byte-level tokens can share a character
            e = max(e, offsets[j][1])
            j += 1
        if added.intersection(ids[i:j]):
            done = j
            continue
        left_ids, left_offsets = _tokenize(tokenizer, text[:x], 0)
        k = 0
        while k < i and k < len(left_ids) and (left_ids[k], left_offsets[k]) == (ids[k],
                                                                                  offsets[k]):
            k += 1
        if k < done:  # would undo an earlier edge: take only the merged token's characters
            k = i
            left_ids, left_offsets = _tokenize(tokenizer, text[s:x], s)
        else:
            left_ids, left_offsets = left_ids[k:], left_offsets[k:]
        right_ids, right_offsets = _tokenize(tokenizer, text[x:e], x)
        new_ids = left_ids + right_ids
        # Keep the merged token when the pieces do not spell the same token strings (say, a
        # tokenizer that puts a space before every call's text): it is trained if any of it
        # is inside a span.
        if "".join(tokenizer.convert_ids_to_tokens(new_ids)) != "".join(
                tokenizer.convert_ids_to_tokens(ids[k:j])):
            done = j
            continue
        ids[k:j], offsets[k:j] = new_ids, left_offsets + right_offsets
        done = k + len(left_ids)  # the right piece may reach over the next edge
    inside = [any(s < b and e > a for a, b in spans) for s, e in offsets]
    return ids, offsets, inside


def _tokenize(tokenizer, text: str, shift: int) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(shift + a, shift + b) for a, b in enc["offset_mapping"]]


def encode_rendered(tokenizer, rendered: Rendered, train_on_all: bool = False) -> Example:
    """Token ids of one rendered example; labels on the tokens inside its spans (on every
    token with ``train_on_all``)."""
    ids, _, inside = tokenize_spans(tokenizer, rendered.text, rendered.spans)
    return Example(ids, [tok if train_on_all or keep else IGNORE for tok, keep in zip(ids, inside)])


def encode_examples(tokenizer, messages: Optional[list[dict]], text: Optional[str] = None, *,
                    tools: Optional[list[dict]] = None, train_on_all: bool = False,
                    system_mode: str = "keep", where: str = "") -> list[Example]:
    """The training examples of one record: a conversation (see :func:`render_examples`: one,
    or one per trained assistant turn) or plain text (one, every token trained). Raises
    :class:`RecordError` (``WHERE: ...``) for a record the template cannot train."""
    if messages is None:
        return [encode_text(tokenizer, text or "")]
    return [encode_rendered(tokenizer, r, train_on_all) for r in render_examples(
        tokenizer, messages, tools, system_mode=system_mode, where=where,
        train_on_all=train_on_all)]


def encode_record(tokenizer, messages: Optional[list[dict]], text: Optional[str],
                  train_on_all: bool = False, **kw) -> Example:
    """One example per record: the one that ends with the conversation's last trained turn
    (for a template that renders incrementally, the only one; training uses
    :func:`encode_examples`). ``kw``: as :func:`encode_examples`."""
    return encode_examples(tokenizer, messages, text, train_on_all=train_on_all, **kw)[-1]


def encode(tokenizer, messages: list[dict], seq_len: Optional[int] = None,
           train_on_all: bool = False, **kw) -> Example:
    """:func:`encode_record` of a conversation, cut to ``seq_len`` tokens when given."""
    ex = encode_record(tokenizer, messages, None, train_on_all, **kw)
    return Example(ex.input_ids[:seq_len], ex.labels[:seq_len])
