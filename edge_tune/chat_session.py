"""One conversation with a loaded model, for every front end: the CLI's ``chat``, the TUI's chat
screen and the demo. Headless: it keeps the history and streams each reply as events
(:class:`Token` pieces, then one :class:`Answer` per side); front ends only render them.

A session has one or two *sides*: (label, adapters) where adapters is an adapter name in the
engine, None for the base, or a mix ``[(name, scale), ...]`` applied together (llama.cpp's
``llama_set_adapters_lora``, the same as the server's per-request ``adapters`` field; the
first adapter's chat template is used). Two sides answer every message one after the other
(``chat --compare``, the TUI's compare mode), each continuing its own conversation. The session calls the engine through its public
``chat_stream`` only, so whatever the engine does for a conversation (prompt caching, the
system-mode fold, stop tokens) applies here too.

Rules every front end gets from here:
- a model with no chat template answers as a plain text completion (``plain_fallback``; the
  front end says so once, see :meth:`ChatSession.plain_sides`);
- a turn the chat template refuses (:class:`~edge_tune.llama.engine.ChatTemplateError`) is not kept
  in the history, and the error says how to fold a system message in when one was sent;
- an answer stopped (:meth:`ChatSession.stop`, Ctrl-C, the consumer closing the stream) keeps
  what was said so far;
- ``/exit`` (``/quit``) and ``/reset`` are the chat's commands (:func:`command_of`);
  ``/good`` and ``/bad`` (with an optional comment) mark the last answer
  (:func:`verdict_of`, :meth:`ChatSession.judge`: a KTO record for ``train --method kto``);
- an empty answer is an error where one answer is all the user asked for
  (:func:`require_text`).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

from edge_tune.errors import CheckFailed, EdgeTuneError

COMMANDS = {"/exit": "exit", "/quit": "exit", "/reset": "reset"}
HELP = ("Ctrl-D or /exit to quit, /reset to clear the history, /good or /bad [comment] to "
        "mark the last answer")
VERDICTS = {"/good": True, "/bad": False}
EMPTY_ANSWER = ("the answer is empty: the model produced no text (it ended at once, or gave "
                "only whitespace or incomplete characters; try another prompt, a higher "
                "--temperature, or check the chat template with --chat-template)")
THINKING_ONLY = ("the answer is empty: the model was still thinking when it stopped (its "
                 "thinking is shown above); raise --max-tokens")


def command_of(line: str) -> Optional[str]:
    """``"exit"`` or ``"reset"`` when ``line`` is a chat command, else None (a message)."""
    return COMMANDS.get(line.strip())


def verdict_of(line: str) -> Optional[tuple[bool, Optional[str]]]:
    """``(True, comment)`` for ``/good [comment]``, ``(False, comment)`` for ``/bad
    [comment]`` (comment None when there is none), else None (not a verdict)."""
    word, _, rest = line.strip().partition(" ")
    if word not in VERDICTS:
        return None
    return VERDICTS[word], rest.strip() or None


# What a side answers with: an adapter name in the engine, None (the base), or a mix
# ((name, scale), ...) applied together.
Adapters = Union[None, str, Sequence[tuple[str, float]]]


def mix_of(adapters: Adapters) -> tuple:
    """``adapters`` as :meth:`edge_tune.llama.engine.Engine.activate_mix` takes them:
    ``((name, scale), ...)``; None -> ``()`` (the base), a name -> that adapter at scale 1."""
    if adapters is None:
        return ()
    if isinstance(adapters, str):
        return ((adapters, 1.0),)
    return tuple((str(name), float(scale)) for name, scale in adapters)


@dataclass
class Side:
    """Who answers: ``label`` as shown, ``adapter`` the engine's adapter name, None (the
    base) or a mix ``((name, scale), ...)``, and the conversation so far (user and assistant
    messages, no system message)."""

    label: str
    adapter: Adapters
    history: list[dict] = field(default_factory=list)

    @property
    def mix(self) -> tuple:
        """The adapter set this side answers under (see :func:`mix_of`)."""
        return mix_of(self.adapter)

    @property
    def template_owner(self) -> Optional[str]:
        """The adapter whose chat template this side's conversation is rendered with (the
        first of a mix, as the engine and the server do); None: the base's."""
        return self.mix[0][0] if self.mix else None

    @property
    def model(self) -> str:
        """Who answers, as a feedback record names it: ``base``, an adapter's name, or a mix
        ``a*0.5+b``."""
        return "+".join(n if s == 1 else f"{n}*{s:g}" for n, s in self.mix) or "base"


@dataclass
class Token:
    """A piece of side ``side``'s reply, as it streams; ``thinking``: a piece of a reasoning
    model's thinking (shown apart from the answer; not part of :attr:`Answer.text`)."""

    side: int
    text: str
    thinking: bool = False


@dataclass
class Answer:
    """Side ``side``'s whole reply (``stopped``: cut short by :meth:`ChatSession.stop`;
    ``reasoning``: a reasoning model's thinking before it)."""

    side: int
    text: str
    stopped: bool = False
    reasoning: str = ""

    @property
    def empty(self) -> bool:
        return not self.text.strip()


Event = Union[Token, Answer]


def require_text(answer: Answer) -> None:
    """CheckFailed (exit 1) for an empty answer: where one answer is all the user asked for
    (``chat --prompt``), silence would look like success."""
    if answer.empty and not answer.stopped:
        raise CheckFailed(THINKING_ONLY if answer.reasoning.strip() else EMPTY_ANSWER)


class ChatSession:
    """The conversation with ``engine`` (an :class:`edge_tune.llama.engine.Engine` with the
    adapters the sides name loaded).

    ``sides``: [(label, adapter name, None or a mix [(name, scale), ...])], one or two;
    default one side, ``"bot"``, with whatever adapter set the engine has active. ``system``, ``temperature`` (0 = greedy) and
    ``max_tokens`` apply to every later message and may be changed between messages.
    ``history``: a conversation to continue (every side starts from it)."""

    def __init__(self, engine, sides: Optional[Sequence[tuple[str, Adapters]]] = None, *,
                 system: Optional[str] = None, temperature: float = 0.7,
                 max_tokens: int = 256, plain_fallback: bool = True,
                 history: Sequence[dict] = ()) -> None:
        self.engine = engine
        pairs = list(sides) if sides else [("bot", engine.active_mix)]
        if not 1 <= len(pairs) <= 2:
            raise ValueError("a chat session has one or two sides")
        self.sides = [Side(label, adapter, [dict(m) for m in history])
                      for label, adapter in pairs]
        self.system = system
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.plain_fallback = plain_fallback
        self._stop = threading.Event()
        self._judged: set[tuple[int, int]] = set()  # (side, history length) of marked answers

    @property
    def side_names(self) -> list[tuple[str, Adapters]]:
        return [(s.label, s.adapter) for s in self.sides]

    @property
    def history(self) -> list[dict]:
        """The conversation that continues: the last side's (the adapter's, side by side)."""
        return self.sides[-1].history

    def messages(self, side: int = 0) -> list[dict]:
        """What the model is sent for side ``side``'s next reply, before the new message."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.sides[side].history

    def training_systems(self) -> list[str]:
        """The runs' training system prompts the sides' conversations get (the engine sends
        one when a conversation has no system message: :meth:`Engine.set_system
        <edge_tune.llama.engine.Engine.set_system>`), each once; none while :attr:`system` is set
        (it wins). Front ends say each once."""
        if self.system:
            return []
        found = (self.engine.system_of(s.template_owner) for s in self.sides)
        return list(dict.fromkeys(text for text in found if text))

    def plain_sides(self) -> list[str]:
        """Labels of the sides whose model has no chat template: with ``plain_fallback`` they
        answer as plain text completions of the conversation (tell the user once)."""
        return [s.label for s in self.sides
                if self.engine.template_of(s.template_owner) is None]

    def judge(self, label: bool, path, comment: Optional[str] = None,
              side: int = -1) -> dict:
        """Mark side ``side``'s last answer good (``label`` True) or bad: its KTO record
        (the conversation before it, with the system prompt the model saw, and the answer;
        :func:`edge_tune.feedback.kto_record`) appended to ``path`` and returned. Raises
        UsageError when there is no answer yet, or the file cannot be written."""
        from edge_tune import feedback
        from edge_tune.errors import UsageError

        chosen = self.sides[side]
        if len(chosen.history) < 2 or chosen.history[-1]["role"] != "assistant":
            raise UsageError("no answer to mark yet: ask something first")
        mark = (self.sides.index(chosen), len(chosen.history))
        if mark in self._judged:
            raise UsageError("the last answer is already marked (one verdict per answer)")
        system = self.system or self.engine.system_of(chosen.template_owner)
        prompt = ([{"role": "system", "content": system}] if system else []) + \
            chosen.history[:-1]
        record = feedback.kto_record(prompt, chosen.history[-1], label, comment,
                                     model=chosen.model)
        feedback.append(path, record)
        self._judged.add(mark)
        return record

    def reset(self) -> None:
        """Start a new conversation (the system prompt stays)."""
        for side in self.sides:
            side.history.clear()
        self._judged.clear()

    def stop(self) -> None:
        """Cut the reply now streaming short (any thread); the next message clears it."""
        self._stop.set()

    def ask(self, text: str) -> Iterator[Event]:
        """Send ``text``: every side answers in turn, streamed as :class:`Token` events, each
        side ending with its :class:`Answer`. Raises what the engine raises
        (:class:`~edge_tune.llama.engine.ChatTemplateError` for a turn the template refuses, the
        turn then not kept)."""
        self._stop.clear()
        for index in range(len(self.sides)):
            yield from self._reply(index, text)

    def answer(self, text: str) -> list[str]:
        """Send ``text`` and return every side's whole reply (no streaming)."""
        return [e.text for e in self.ask(text) if isinstance(e, Answer)]

    def _reply(self, index: int, text: str) -> Iterator[Event]:
        side = self.sides[index]
        turn = {"role": "user", "content": text}
        messages = self.messages(index) + [turn]
        pieces: list[str] = []
        thought: list[str] = []  # a reasoning model's thinking (not kept in the history)
        if self._stop.is_set():  # stopped while an earlier side answered: this one says nothing
            side.history += [turn, {"role": "assistant", "content": ""}]
            yield Answer(index, "", stopped=True)
            return
        if self.engine.active_mix != side.mix:
            self.engine.activate_mix(side.mix)
        stopped = False
        try:
            with _system_mode_hint(messages), contextlib.closing(self.engine.chat_stream(
                    messages, temperature=self.temperature, max_tokens=self.max_tokens,
                    plain_fallback=self.plain_fallback, split_reasoning=True)) as stream:
                for piece in stream:
                    if piece.reasoning:
                        thought.append(piece.reasoning)
                        yield Token(index, piece.reasoning, thinking=True)
                    if piece.text:
                        pieces.append(piece.text)
                        yield Token(index, piece.text)
                    if self._stop.is_set():
                        stopped = True
                        break
        except EdgeTuneError:
            raise  # refused (template, context): nothing was said, the turn is not kept
        except BaseException:
            # interrupted (Ctrl-C, the consumer closed the stream): what was said stays
            side.history += [turn, {"role": "assistant", "content": "".join(pieces)}]
            raise
        reply = "".join(pieces)
        side.history += [turn, {"role": "assistant", "content": reply}]
        yield Answer(index, reply, stopped, "".join(thought))


@contextlib.contextmanager
def _system_mode_hint(messages: list[dict]):
    """Add the system-mode hint to a chat template's refusal when a system message was sent
    (templates without a system role refuse it)."""
    from edge_tune.llama.engine import ChatTemplateError

    try:
        yield
    except ChatTemplateError as exc:
        if not any(m.get("role") == "system" for m in messages):
            raise
        raise ChatTemplateError(f"{exc} (to put the system text into the first user turn: "
                                "--system-mode fold)") from None
