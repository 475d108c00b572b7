"""The error every request check raises, and OpenAI's JSON error shape
(``{"error": {"message", "type", "param", "code"}}``). Pure; shared by the request parser and
its helpers (tools, grammars, adapter mixes) without import cycles."""

from __future__ import annotations

from collections.abc import Mapping

from edge_tune.errors import EdgeTuneError, spelled


class RequestError(Exception):
    """A request the server refuses; rendered as OpenAI's JSON error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def unknown_model(name: str, known: list[str]) -> RequestError:
    return RequestError(404, f"The model '{name}' does not exist; this server has: "
                             f"{', '.join(known)}", param="model", code="model_not_found")


def from_core(exc: EdgeTuneError, status: int, fields: Mapping[str, str],
              sent: Mapping[str, object] | None = None, **kw) -> RequestError:
    """The RequestError for a core error, in the API's words: a setting that ``fields`` maps
    to a request field (``{"adapter": "path"}``) is spelled ``'path'``, with the value as the
    client sent it (``sent``), and becomes ``param``; any other setting is one of the server's
    own options, left as the command line that started it spells it. ``kw``: ``type``,
    ``code``, and the ``param`` to use when the error names no request field."""
    field = fields.get(exc.setting or "")
    if field is None:
        return RequestError(status, str(exc), **kw)
    value = (sent or {}).get(field) if exc.value is not None else None
    return RequestError(status, spelled(exc, f"'{field}'", value), **{**kw, "param": field})
