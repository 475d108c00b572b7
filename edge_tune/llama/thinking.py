"""A reasoning model's thinking told apart from its answer, as the text streams.

Reasoning models write their thinking between think markers before the answer
(``<think>\\n...\\n</think>\\n\\nANSWER``: Qwen3, QwQ, DeepSeek-R1 and its distills; other
pairs in :data:`edge_tune.data.reasoning.KNOWN_MARKERS`). A chat template that has a pair
(:func:`template_markers`) marks a model that does; its generation prompt may already open
the block (DeepSeek-R1's ends with ``<think>\\n``: the model's first words are thinking) or
open and close it (Qwen3's with ``enable_thinking: false``: ``<think>\\n\\n</think>\\n\\n``,
no thinking follows). :class:`ThinkSplitter` takes the answer's text piece by piece and hands
back (reasoning, content) pieces: only a block at the start of the answer is thinking (a
marker later in the answer is the answer's own text); the markers and the newlines around
them are left out, as llama-server and DeepSeek's API return ``reasoning_content``.

Pure: no llama.cpp.
"""

from __future__ import annotations

from edge_tune.data.reasoning import KNOWN_MARKERS


def template_markers(template: str | None) -> tuple[str, str] | None:
    """The first pair of :data:`~edge_tune.data.reasoning.KNOWN_MARKERS` whose two markers
    both appear in the chat template text ``template``; None when none does (or no
    template): the model's output is all answer."""
    if not template:
        return None
    for start, end, _source in KNOWN_MARKERS:
        if start in template and end in template:
            return start, end
    return None


def prompt_opens(prompt: str, markers: tuple[str, str]) -> bool:
    """Whether the rendered ``prompt`` ends inside a think block: its last start marker
    comes after its last end marker and only whitespace follows it (the model's first
    words are then thinking)."""
    start, end = markers
    at = prompt.rfind(start)
    return at >= 0 and at > prompt.rfind(end) and not prompt[at + len(start):].strip()


def _held(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` may be the start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ThinkSplitter:
    """Feed the answer's text (:meth:`feed`), then :meth:`finish`; each returns the
    (reasoning, content) text that is certain so far. ``markers``: (start, end);
    ``opened``: the prompt already opened the block (:func:`prompt_opens`).

    Text that may still be a marker, and whitespace that may turn out to sit between the
    thinking and the end marker, is held until the next piece decides it."""

    def __init__(self, markers: tuple[str, str], opened: bool = False) -> None:
        self.start, self.end = markers
        self.state = "thinking" if opened else "before"  # then "thinking" -> "answer"
        self._buf = ""
        self._began = False  # thinking text has been handed out (its leading blanks gone)

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        reasoning, content = "", ""
        while True:
            if self.state == "before":
                lead = self._buf.lstrip()
                if lead.startswith(self.start):
                    self._buf, self.state = lead[len(self.start):], "thinking"
                    continue
                if self.start.startswith(lead):  # blank, or maybe the start marker
                    return reasoning, content
                self.state = "answer"
                continue
            if self.state == "thinking":
                at = self._buf.find(self.end)
                if at >= 0:
                    reasoning += self._thought(self._buf[:at].rstrip())
                    self._buf, self.state = self._buf[at + len(self.end):], "after"
                    continue
                keep = _held(self._buf, self.end)
                body = self._buf[:len(self._buf) - keep]
                sure = body.rstrip()  # blanks before the end marker are left out
                reasoning += self._thought(sure)
                self._buf = body[len(sure):] + self._buf[len(self._buf) - keep:]
                return reasoning, content
            if self.state == "after":  # the blank lines between the block and the answer
                self._buf = self._buf.lstrip()
                if not self._buf:
                    return reasoning, content
                self.state = "answer"
            content += self._buf
            self._buf = ""
            return reasoning, content

    def _thought(self, text: str) -> str:
        if not self._began:
            text = text.lstrip()
            self._began = bool(text)
        return text

    def finish(self) -> tuple[str, str]:
        """What is held, once the answer ended: an unclosed block is all thinking (an
        answer cut by max_tokens while thinking has no content)."""
        rest, self._buf = self._buf, ""
        if self.state == "thinking":
            return self._thought(rest.rstrip()), ""
        if self.state == "before":
            return "", rest
        return "", rest.lstrip() if self.state == "after" else rest
