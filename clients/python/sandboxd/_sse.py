"""A reader of text/event-stream (server-sent events), as the WHATWG HTML standard defines it."""

from __future__ import annotations

from typing import Any, Iterator, List, NamedTuple, Optional

__all__ = ["SSEEvent", "read_events"]


class SSEEvent(NamedTuple):
    """One dispatched event.

    ``event`` is its type ("message" when it names none), ``data`` its data lines joined with
    "\\n", and ``last_id`` the stream's last event ID once this event arrived (what a reconnection
    sends as Last-Event-ID).
    """

    event: str
    data: str
    last_id: Optional[str]


class read_events:
    """Iterate the events of an open response (anything with ``readline``); ``close()`` closes it.

    Lines end in CRLF, LF or CR; ``field: value`` lines build an event, a blank line dispatches it;
    comments (``:…``) and unknown fields are ignored; a block without data dispatches nothing but
    its ``id`` still becomes the last event ID; an unterminated last block is dropped.
    """

    def __init__(self, resp: Any, last_id: Optional[str] = None) -> None:
        self._resp = resp
        self._id_buf = last_id
        self.last_id = last_id

    def close(self) -> None:
        close = getattr(self._resp, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "read_events":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _lines(self) -> Iterator[str]:
        # readline splits at LF; a CR before it (CRLF) goes, and a lone CR inside ends a line too.
        # (A stream that uses only CR would be read to its end before any event: none does.)
        while True:
            raw = self._resp.readline()
            if not raw.endswith(b"\n"):
                return  # the end, or a partial last line, which is dropped
            text = raw[:-1].decode("utf-8", "replace")
            if text.endswith("\r"):
                text = text[:-1]
            for part in text.split("\r"):
                yield part

    def __iter__(self) -> Iterator[SSEEvent]:
        event = ""
        data: List[str] = []
        has_data = False
        for line in self._lines():
            if line == "":
                self.last_id = self._id_buf
                if has_data:
                    yield SSEEvent(event or "message", "\n".join(data), self.last_id)
                event, data, has_data = "", [], False
                continue
            if line.startswith(":"):
                continue
            field, sep, value = line.partition(":")
            if sep and value.startswith(" "):
                value = value[1:]
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
                has_data = True
            elif field == "id":
                if "\0" not in value:
                    self._id_buf = value
