"""Log probabilities of the sampled tokens, recorded while llama.cpp samples.

llama-cpp-python computes logprobs only for a model loaded with ``logits_all=True`` (a
``n_ctx x n_vocab`` float array, ~800 MB for a 49k vocabulary at 4096 tokens). Instead,
:class:`LogprobRecorder` is a llama-cpp-python *logits processor*: the sampler chain calls it
first at every step with the step's raw logits (the model's distribution, before penalties,
grammar and temperature, as OpenAI reports it) and the tokens so far. The token sampled at
step *t* is the last input token at step *t+1*. The last step's token is never evaluated: the
engine says which it was (``Piece.last_token``); without that it is found from the answer's
text when the answer was cut at ``max_tokens`` (the token that spells the text not yet
covered, the most likely one when several, or none, do). :func:`covering` then keeps the
tokens of the text returned: a stop string's tokens go, and a token the stop string begins
inside is cut to the part returned.
Token text is shown with special tokens spelled out; ``bytes`` is what the token adds to the
answer (empty for a control token, which the answer's text leaves out).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable


@dataclass
class TokenLogprob:
    """One answer token: its text and bytes, its logprob, and the ``top`` alternatives
    (best first) as (text, bytes, logprob)."""

    text: str
    bytes: bytes
    logprob: float
    top: list


class LogprobRecorder:
    """A logits processor (``(input_ids, logits) -> logits``, logits unchanged) that records
    the log-softmax of each step. ``top``: how many alternatives to keep per token (0-20);
    ``token_bytes(id, special)``: a token's bytes, control tokens spelled out or empty;
    ``tokenize(bytes)``: text -> token ids (no special tokens parsed)."""

    def __init__(self, top: int, token_bytes: Callable[[int, bool], bytes],
                 tokenize: Callable[[bytes], list[int]]) -> None:
        self.top = top
        self.token_bytes = token_bytes
        self.tokenize = tokenize
        self._pending = None  # (step, log-softmax vector) of the step not yet resolved
        self._done: list[TokenLogprob] = []
        self._lock = threading.Lock()

    def __call__(self, input_ids, logits):
        import numpy as np

        if self._pending is not None:
            self._resolve(int(input_ids[-1]))
        x = np.asarray(logits, dtype=np.float64)
        m = x.max()
        lse = m + np.log(np.exp(x - m).sum())
        self._pending = x - lse
        return logits

    def _resolve(self, token: int) -> None:
        import numpy as np

        lp = self._pending
        self._pending = None
        top = []
        if self.top:
            best = np.argpartition(-lp, min(self.top, len(lp) - 1))[: self.top]
            best = best[np.argsort(-lp[best], kind="stable")]
            top = [self._entry(int(i), float(lp[i])) for i in best]
        text = self.token_bytes(token, True).decode("utf-8", errors="replace")
        with self._lock:
            self._done.append(TokenLogprob(text, self.token_bytes(token, False),
                                           float(lp[token]), top))

    def _entry(self, token: int, logprob: float):
        raw = self.token_bytes(token, True)
        return raw.decode("utf-8", errors="replace"), raw, logprob

    def take(self, start: int) -> list[TokenLogprob]:
        """The tokens resolved so far from index ``start`` on (for streaming)."""
        with self._lock:
            return self._done[start:]

    def finish(self, finish_reason: str | None, answer: str,
               last_token: int | None = None) -> list[TokenLogprob]:
        """Every token sampled for the answer (``answer``: its whole text; ``last_token``:
        the last one sampled, when known), once generation ended; :func:`covering` keeps
        those of the text returned."""
        if self._pending is not None:
            if last_token is not None:
                self._resolve(last_token)
            elif finish_reason == "length":
                self._resolve(self._last_token(answer))
            self._pending = None
        with self._lock:
            return list(self._done)

    def _last_token(self, answer: str) -> int:
        # the answer's text drops bytes that are not valid UTF-8: compare text, not bytes
        covered = b"".join(t.bytes for t in self._done).decode("utf-8", errors="ignore")
        rest = answer[len(covered):].encode("utf-8") if answer.startswith(covered) else b""
        lp = self._pending
        found = self.tokenize(rest) if rest else []
        if len(found) == 1:
            return found[0]
        return int(lp.argmax())


def covering(tokens: list[TokenLogprob], text: str) -> list[TokenLogprob]:
    """The tokens that spell ``text``, the answer as returned (its bytes decoded as the
    answer is, bytes that are not UTF-8 left out): tokens past its end (the ones that made a
    stop string, which the answer leaves out) go, and a token the end falls inside is cut to
    the part returned (its ``text`` and ``bytes``; its logprob is the whole token's).
    ``tokens`` as they are when they do not spell ``text``."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    out, at = [], 0
    for t in tokens:
        if at >= len(text):
            break
        state = decoder.getstate()
        got = decoder.decode(t.bytes)
        if text.startswith(got, at) and at + len(got) <= len(text):
            out.append(t)
            at += len(got)
            continue
        decoder.setstate(state)  # the text ends inside this token: its part returned
        part, rest = b"", text[at:]
        for byte in t.bytes:
            if not rest:
                break
            more = decoder.decode(bytes([byte]))
            if not rest.startswith(more):
                break
            part, rest = part + bytes([byte]), rest[len(more):]
        if rest:
            return tokens
        out.append(TokenLogprob(part.decode("utf-8", errors="replace"), part, t.logprob,
                                t.top))
        at = len(text)
    return out if at == len(text) else tokens


class StreamedLogprobs:
    """The logprobs of a streamed answer (OpenAI and Ollama routes), handed out as the text
    they spell is sent."""

    def __init__(self, recorder) -> None:
        self.recorder = recorder
        self.sent = 0  # tokens handed out
        self.spelled = 0  # their bytes

    def ready(self, said: int) -> list:
        """The resolved tokens not handed out yet whose bytes lie within the first ``said``
        bytes of the answer (text that may start a stop string is held back)."""
        got = []
        for t in self.recorder.take(self.sent):
            if self.spelled + len(t.bytes) > said:
                break
            got.append(t)
            self.spelled += len(t.bytes)
        self.sent += len(got)
        return got

    def rest(self, finish_reason: str | None, answer: str, last_token: int | None) -> list:
        """The tokens left once the whole ``answer`` (as the model wrote it) and its last
        sampled token are known."""
        tail = covering(self.recorder.finish(finish_reason, answer, last_token),
                        answer)[self.sent:]
        self.sent += len(tail)
        return tail


def prompt_logprobs(engine, prompt: str | list, mix: tuple, top: int,
                    after: bool = False) -> list[TokenLogprob]:
    """The tokens of ``prompt`` (a text, as a completion reads it, or token ids) with their
    logprobs under adapter set ``mix`` and ``top`` alternatives each (:meth:`Engine.prompt_logprobs
    <edge_tune.llama.engine.Engine.prompt_logprobs>`): OpenAI's ``echo``. A first token that
    nothing precedes has logprob and alternatives None. ``bytes`` spell control tokens out:
    they are part of the prompt's text. ``after``: one entry more, the likeliest next token
    (``bytes`` as an answer has it: empty for a control token)."""
    ids, scored = engine.prompt_logprobs(prompt, mix, top, after)
    out = []
    for k, got in enumerate(scored):
        following = k == len(ids)  # the entry ``after`` adds
        token = got[1][0][0] if following else ids[k]
        raw = engine.token_bytes(token, True)
        text = raw.decode("utf-8", errors="replace")
        if got is None:
            out.append(TokenLogprob(text, raw, None, None))
            continue
        alts = []
        for other, lp in got[1][:top]:
            b = engine.token_bytes(other, True)
            alts.append((b.decode("utf-8", errors="replace"), b, lp))
        out.append(TokenLogprob(text, engine.token_bytes(token, False) if following else raw,
                                got[0], alts))
    return out
