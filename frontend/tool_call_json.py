"""Tool calls' JSON read from a growing buffer, for the streaming tool-call parsers
(`tool_parsers.py`): a JSON value re-written as `json.dumps(..., ensure_ascii=False)` writes it
while its text arrives (`JsonValue`), and the two shapes calls take around their arguments,
{"name": ..., "arguments": {...}} (`CallObject`) and name[ARGS]{...} (`NamedCall`).

Each reader's `read(buf, pos, final)` consumes what it can of `buf` from `pos` and returns where
it stopped; `final` says no more text comes. Text that cannot be a call raises `NotACall`.
"""

from __future__ import annotations

import json
import math
import re


class NotACall(Exception):
    """The text is not a call of the format."""


# ---- JSON read from a growing buffer --------------------------------------------------------

WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = re.compile(r"[-+0-9.eE]*")
_STRING_RUN = re.compile(r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
_HIGH_SURROGATE_END = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}$")
_PARTIAL_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?")
_LITERALS = {"t": "true", "f": "false", "n": "null"}


class JsonValue:
    """One JSON value read from a growing buffer and written again token by token as
    `json.dumps(value, ensure_ascii=False)` writes it, so its output can be sent before the
    value ends. `parts` only grows; `done` once the value is complete. A string is written as
    far as its complete characters go (a surrogate pair waits for its second half).

        value ──"{"──► first_key ──"──► key ─► colon ─► value ─► after ──","──► key | value
          │            └──"}"──► (close)                           └──"}" / "]"──► (close)
          └──"["──► first_value ──"]"──► (close)       (close): `done` at depth 0, else after
    """

    def __init__(self, require_object: bool = False) -> None:
        self.parts: list[str] = []
        self.done = False
        self._require_object = require_object
        self._stack: list[str] = []  # the open containers: "{" or "["
        self._expect = "value"
        self._string: str | None = None  # "key" or "value" while inside a string

    def read(self, buf: str, pos: int, final: bool) -> int:
        """Reads `buf[pos:]` as far as it goes; returns the position of the first character
        not yet used (an unfinished token waits for more text unless `final`)."""
        while not self.done:
            if self._string is not None:
                new = self._read_string(buf, pos, final)
            else:
                pos = WHITESPACE.match(buf, pos).end()
                if pos == len(buf):
                    if final:
                        raise NotACall("unterminated JSON")
                    return pos
                new = self._read_token(buf, pos, final)
            if new is None:  # an unfinished token
                return pos
            pos = new
        return pos

    def _close(self) -> None:
        self._expect = "after" if self._stack else "done"
        self.done = not self._stack

    def _read_token(self, buf: str, pos: int, final: bool) -> int | None:
        c, expect = buf[pos], self._expect
        if expect == "colon" and c == ":":
            self.parts.append(": ")
            self._expect = "value"
        elif expect == "after" and c == ",":
            self.parts.append(", ")
            self._expect = "key" if self._stack[-1] == "{" else "value"
        elif (expect == "after" and c == {"{": "}", "[": "]"}[self._stack[-1]]) or \
                (expect == "first_key" and c == "}") or (expect == "first_value" and c == "]"):
            self._stack.pop()
            self.parts.append(c)
            self._close()
        elif expect in ("key", "first_key") and c == '"':
            self.parts.append(c)
            self._string = "key"
        elif expect not in ("value", "first_value"):
            raise NotACall(f"unexpected {c!r} in JSON")
        elif self._require_object and not self._stack and c != "{":
            raise NotACall("the arguments are not a JSON object")
        elif c in "{[":
            self._stack.append(c)
            self.parts.append(c)
            self._expect = "first_key" if c == "{" else "first_value"
        elif c == '"':
            self.parts.append(c)
            self._string = "value"
        elif c in _LITERALS:
            word = _LITERALS[c]
            got = buf[pos:pos + len(word)]
            if got != word:
                if not final and word.startswith(got):
                    return None
                raise NotACall(f"bad literal {got!r}")
            self.parts.append(word)
            self._close()
            return pos + len(word)
        elif c == "-" or c.isdigit():
            end = _NUMBER_CHARS.match(buf, pos).end()
            if end == len(buf) and not final:
                return None
            token = buf[pos:end]
            if not _NUMBER.fullmatch(token):
                raise NotACall(f"bad number {token!r}")
            value = json.loads(token)
            finite = not isinstance(value, float) or math.isfinite(value)  # 1e999: as written
            self.parts.append(json.dumps(value) if finite else token)
            self._close()
            return end
        else:
            raise NotACall(f"unexpected {c!r} in JSON")
        return pos + 1

    def _read_string(self, buf: str, pos: int, final: bool) -> int | None:
        end = _STRING_RUN.match(buf, pos).end()
        wait = not final and _HIGH_SURROGATE_END.search(buf, pos, end) is not None and \
            (end == len(buf) or _PARTIAL_ESCAPE.fullmatch(buf, end) is not None)
        if wait:  # a high surrogate may pair with the escape still to come
            end -= 6
        if end > pos:
            text = json.loads('"' + buf[pos:end] + '"')
            self.parts.append(json.dumps(text, ensure_ascii=False)[1:-1])
        if end < len(buf) and buf[end] == '"' and not wait:
            self.parts.append('"')
            if self._string == "key":
                self._expect = "colon"
            else:
                self._close()
            self._string = None
            return end + 1
        if wait or (not final and (end == len(buf) or _PARTIAL_ESCAPE.fullmatch(buf, end))):
            return end if end > pos else None
        raise NotACall("unterminated or malformed JSON string")


class CallObject:
    """A call written as a JSON object, {"name": "f", "arguments": {...}} ("parameters" for
    Llama), read from a growing buffer: `name` is set once its string is complete, `args` once
    the arguments object begins; other members are read and ignored."""

    ARGUMENT_KEYS = ("arguments", "parameters")

    def __init__(self) -> None:
        self.name: str | None = None
        self.args: JsonValue | None = None
        self.done = False
        self._expect = "{"  # "{" | key | colon | value | after
        self._key: str | None = None
        self._member: JsonValue | None = None  # the key or value being read

    def read(self, buf: str, pos: int, final: bool) -> int:
        while not self.done:
            if self._member is not None:
                pos = self._member.read(buf, pos, final)
                if not self._member.done:
                    return pos
                self._end_member("".join(self._member.parts))
                continue
            pos = WHITESPACE.match(buf, pos).end()
            if pos == len(buf):
                if final:
                    raise NotACall("the call's JSON is unterminated")
                return pos
            pos = self._read_token(buf[pos], pos)
        return pos

    def _read_token(self, c: str, pos: int) -> int:
        if self._expect in ("{", "colon") and c == {"{": "{", "colon": ":"}[self._expect]:
            self._expect = "key" if c == "{" else "value"
            return pos + 1
        if self._expect == "after" and c in ",}":
            if c == "}" and (self.name is None or self.args is None):
                raise NotACall("a call needs a string name and an arguments object")
            self._expect, self.done = "key", c == "}"
            return pos + 1
        if self._expect == "key" and c == '"':
            self._member = JsonValue()
        elif self._expect == "value" and self._key in self.ARGUMENT_KEYS:
            if self.args is not None:
                raise NotACall("a call has one arguments object")
            self._member = self.args = JsonValue(require_object=True)
        elif self._expect == "value":
            self._member = JsonValue()
        else:
            raise NotACall(f"unexpected {c!r} in a call")
        return pos  # the member reads from its first character

    def _end_member(self, text: str) -> None:
        self._member = None
        if self._expect == "key":
            self._key, self._expect = json.loads(text), "colon"
            return
        self._expect = "after"
        if self._key == "name":
            name = json.loads(text)
            if self.name is not None or not isinstance(name, str) or not name:
                raise NotACall("a call needs one non-empty string name")
            self.name = name


class NamedCall:
    """A call written as name[ARGS]{...} (Mistral's v11+ tokenizers)."""

    ARGS = "[ARGS]"
    _NAME = re.compile(r"[A-Za-z0-9_.\-]*")

    def __init__(self) -> None:
        self.name: str | None = None
        self.args: JsonValue | None = None
        self.done = False

    def read(self, buf: str, pos: int, final: bool) -> int:
        if self.args is None:
            end = self._NAME.match(buf, pos).end()
            if not buf.startswith(self.ARGS, end):
                if not final and self.ARGS.startswith(buf[end:]):
                    return pos
                raise NotACall("expected name[ARGS]")
            if end == pos:
                raise NotACall("a call needs a name")
            self.name, self.args = buf[pos:end], JsonValue(require_object=True)
            pos = end + len(self.ARGS)
        pos = self.args.read(buf, pos, final)
        self.done = self.args.done
        return pos
