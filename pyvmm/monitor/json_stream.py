"""Splitting a QMP byte stream into JSON messages, as QEMU's JSON streamer does.

QMP clients need not end a message with a newline (``qemu.qmp`` does not): a message ends where
its outermost ``{...}`` closes.  :class:`JsonSplitter` finds those ends without parsing, keeping
strings and escapes in mind, and bounds everything a client can make it hold:

* a message longer than ``max_bytes`` is reported once and its bytes are dropped up to the next
  newline (a line-oriented client resumes there; nothing of it is kept);
* nesting deeper than ``max_depth`` likewise;
* bytes outside any message that are not whitespace (a bare word, a stray ``}``) are reported
  once per run of them.

:meth:`JsonSplitter.feed` returns, in order, each complete message's bytes or a
:class:`SplitError` with QEMU's ``JSON parse error`` text.
"""

from __future__ import annotations

import dataclasses
import re

MAX_MESSAGE = 1 << 20
MAX_DEPTH = 1024

_STRUCTURE = re.compile(rb'["{}\[\]]')
_IN_STRING = re.compile(rb'["\\]')
_NOT_SPACE = re.compile(rb"[^ \t\r\n]")
_TOKEN_END = re.compile(rb"[ \t\r\n{\[]")
# a JSON value that is not an object or array, followed by a separator: passed on whole, so that
# the server can say what QEMU says of it (input must be an object), not "invalid token"
_SCALAR = re.compile(rb'(?:-?[0-9][0-9.eE+-]*|true|false|null|"(?:[^"\\]|\\.)*")'
                     rb'(?=[ \t\r\n{\[]|$)')


@dataclasses.dataclass(frozen=True)
class SplitError:
    message: str


class JsonSplitter:
    def __init__(self, max_bytes: int = MAX_MESSAGE, max_depth: int = MAX_DEPTH) -> None:
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._skipping = False  # dropping an over-long message up to the next newline
        self._junk = False  # inside a run of bytes outside any message

    def feed(self, data: bytes) -> list[bytes | SplitError]:
        out: list[bytes | SplitError] = []
        pos, end = 0, len(data)
        while pos < end:
            if self._skipping:
                newline = data.find(b"\n", pos)
                if newline < 0:
                    return out
                pos = newline + 1
                self._skipping = False
                continue
            if self._depth == 0:
                pos = self._between_messages(data, pos, out)
                continue
            pos = self._in_message(data, pos, out)
        return out

    def _between_messages(self, data: bytes, pos: int, out: list[bytes | SplitError]) -> int:
        if self._junk:
            stop = _TOKEN_END.search(data, pos)
            if stop is None:
                return len(data)
            self._junk = False
            return stop.start()
        found = _NOT_SPACE.search(data, pos)
        if found is None:
            return len(data)
        start = found.start()
        if data[start] in b"{[":
            self._depth = 1
            self._buf = bytearray(data[start:start + 1])
            return start + 1
        scalar = _SCALAR.match(data, start)
        if scalar is not None and scalar.end() < len(data):
            out.append(scalar.group())
            return scalar.end()
        self._junk = True
        stop = _TOKEN_END.search(data, start)
        word = data[start:stop.start() if stop else min(len(data), start + 32)][:32]
        out.append(SplitError(f"JSON parse error, invalid token "
                              f"'{word.decode('utf-8', 'replace')}'"))
        return start + 1

    def _in_message(self, data: bytes, pos: int, out: list[bytes | SplitError]) -> int:
        start = pos
        while pos < len(data):
            if self._escape:
                self._escape = False
                pos += 1
                continue
            found = (_IN_STRING if self._in_string else _STRUCTURE).search(data, pos)
            if found is None:
                pos = len(data)
                break
            char = data[found.start()]
            pos = found.end()
            if self._in_string:
                if char == 0x5C:  # backslash: the next byte is escaped
                    self._escape = True
                else:
                    self._in_string = False
            elif char == 0x22:
                self._in_string = True
            elif char in b"{[":
                self._depth += 1
                if self._depth > self.max_depth:
                    return self._overflow(out, f"JSON parse error, nesting deeper than "
                                               f"{self.max_depth}", pos, skip=True)
            else:
                self._depth -= 1
                if self._depth == 0:
                    self._buf += data[start:pos]
                    if len(self._buf) > self.max_bytes:
                        return self._overflow(out, self._too_long(), pos, skip=False)
                    out.append(bytes(self._buf))
                    self._buf = bytearray()
                    return pos
        if len(self._buf) + (pos - start) > self.max_bytes:
            return self._overflow(out, self._too_long(), pos, skip=True)
        self._buf += data[start:pos]
        return pos

    def _too_long(self) -> str:
        return f"JSON parse error, message longer than {self.max_bytes} bytes"

    def _overflow(self, out: list[bytes | SplitError], message: str, pos: int, *,
                  skip: bool) -> int:
        """Report ``message``, forget the message under way, and (``skip``) drop what is left
        of it up to the next newline."""
        out.append(SplitError(message))
        self._buf = bytearray()
        self._depth = 0
        self._in_string = self._escape = False
        self._skipping = skip
        return pos
