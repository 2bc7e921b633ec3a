"""Tool-call parsers: an assistant's text -> OpenAI `tool_calls`, whole or as a stream.

As vLLM's `--tool-call-parser`, one parser per way a model family writes its calls:

    hermes       <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>   Qwen2.5, Qwen3
    llama3_json  <|python_tag|>{"name": "f", "parameters": {...}}; {...}         Llama 3.1-3.3
    mistral      [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]            Mistral (v3, v7)
                 [TOOL_CALLS]f[ARGS]{...}[TOOL_CALLS]g[ARGS]{...}                 Mistral (v11+)
    pythonic     [f(a=1, b="x"), g()]                                            Llama 3.2, Llama 4

`Parser.parse(text)` reads a whole message; a `Parser()` reads a stream: `feed(delta_text)` per
detokenized delta, `finish()` at the end, each returning `Delta`s in OpenAI's stream shape (per
call a header with index, id and name, then fragments of its arguments).

Rules every parser keeps:
- Fallback: text that is not calls of the format (bad JSON, a call cut off mid-way, a name that
  is not a string, ...) is content; `parse` then returns the whole text as content and no
  calls, as vLLM does.
- Arguments: `arguments` is `json.dumps(json.loads(raw), ensure_ascii=False)` of the arguments
  object the model wrote (separators ", " and ": ", strings re-escaped, numbers as json.dumps
  writes them), built token by token (`tool_call_json.JsonValue`) so a stream sends it as
  it arrives: the fragments of a call concatenate to exactly `parse`'s `arguments`. The one
  difference from loads + dumps: an object with a repeated key keeps both members.
- Streaming = parse: for any text `parse` reads as calls, feeding it in any chunking yields the
  same content and calls. Text that may still be the start of a tag is held back, never sent as
  content until it is known not to be one. A call that goes bad before its header is sent goes
  out as content, so the stream again equals `parse`; one that goes bad after (max_tokens cut
  it mid-arguments) stands as sent, and the text after it is content: a stream cannot take
  back what it sent.
- mistral needs its [TOOL_CALLS] / [ARGS] tokens in the text: detokenize with
  skip_special_tokens=False. llama3_json also reads a message whose <|python_tag|> (a special
  token) was dropped. Ids are "call_" + 24 alphanumerics, as OpenAI's; mistral's are 9
  alphanumerics, the only ids Mistral's chat templates take back.
"""

from __future__ import annotations

import ast
import json
import secrets
import string
from dataclasses import dataclass
from typing import Any, ClassVar

from .tool_call_json import WHITESPACE, CallObject, NamedCall, NotACall

_ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (what OpenAI sends)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """An entry of a chunk's `delta.tool_calls`: a call's header (its first delta: `id` and
    `name`) or a fragment of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments_fragment: str | None = None

    def to_openai(self) -> dict[str, Any]:
        if self.name is not None:
            return {"index": self.index, "id": self.id, "type": "function",
                    "function": {"name": self.name, "arguments": ""}}
        return {"index": self.index, "function": {"arguments": self.arguments_fragment}}


Delta = ContentDelta | ToolCallDelta


@dataclass(frozen=True)
class ParsedMessage:
    content: str | None
    tool_calls: list[ToolCall]

    @classmethod
    def from_deltas(cls, deltas: list[Delta]) -> ParsedMessage:
        """What a client rebuilds from a stream: content joined, each call's fragments joined."""
        content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
        heads = {d.index: d for d in deltas if isinstance(d, ToolCallDelta) and d.name}
        args = {i: "".join(d.arguments_fragment or "" for d in deltas
                           if isinstance(d, ToolCallDelta) and d.index == i) for i in heads}
        calls = [ToolCall(heads[i].id or "", heads[i].name or "", args[i]) for i in sorted(heads)]
        return cls(content or None, calls)


# ---- the parsers ----------------------------------------------------------------------------


class ToolParser:
    """The state every format shares. `_buf` is the message so far; everything before `_pos`
    is dealt with (sent as content, dropped, or read into a call). A subclass's `_step`
    advances its own states; "plain" (the message is content) and "failed" (the rest is
    content) are the base's: everything from `_pos` goes out as content.

    `failed` is True once text turned out not to be calls; `parse` then returns it all as
    content.
    """

    name: ClassVar[str]
    id_prefix: ClassVar[str] = "call_"
    id_length: ClassVar[int] = 24

    def __init__(self) -> None:
        self.failed = False
        self._buf = ""
        self._pos = 0
        self._state = "start"
        self._call: CallObject | NamedCall | None = None
        self._call_start = 0  # where the call's text starts: the content if it goes bad
        self._num_calls = 0  # headers sent
        self._sent_header = False
        self._sent_parts = 0  # of the call's `args.parts`
        self._after_call = False  # whitespace only, after a call, is dropped

    @classmethod
    def parse(cls, text: str) -> ParsedMessage:
        """The whole message: the stream read in one piece, or all content if it `failed`."""
        parser = cls()
        deltas = parser.feed(text) + parser.finish()
        return ParsedMessage(text or None, []) if parser.failed \
            else ParsedMessage.from_deltas(deltas)

    def feed(self, delta_text: str) -> list[Delta]:
        self._buf += delta_text
        return self._run(final=False)

    def finish(self) -> list[Delta]:
        return self._run(final=True)

    def _new_id(self) -> str:
        return self.id_prefix + "".join(secrets.choice(_ALNUM) for _ in range(self.id_length))

    def _run(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        while self._state not in ("plain", "failed") and self._step(out, final):
            pass
        if self._state in ("plain", "failed") and self._pos < len(self._buf):
            out.append(ContentDelta(self._buf[self._pos:]))
            self._pos = len(self._buf)
        return out

    def _step(self, out: list[Delta], final: bool) -> bool:
        """Advances one state; False when it needs more text."""
        raise NotImplementedError

    def _fail(self) -> bool:
        """The text is not calls: from the call's start (or, when its header went out, from
        here) the rest is content."""
        self.failed, self._state = True, "failed"
        if not self._sent_header:
            self._pos = self._call_start
        return True

    def _send_text(self, out: list[Delta], end: int, final: bool) -> None:
        piece = self._buf[self._pos:end]
        if self._after_call and not piece.strip():
            if final:  # whitespace that only follows calls is dropped; else it waits
                self._pos = end
            return
        self._after_call = False
        if piece:
            out.append(ContentDelta(piece))
        self._pos = end

    def _scan_text(self, out: list[Delta], final: bool, tag: str) -> int | None:
        """Sends content up to `tag`; its position, or None (a tag prefix at the end held)."""
        at = self._buf.find(tag, self._pos)
        if at >= 0:
            self._send_text(out, at, final=True)
            return at
        end = len(self._buf)
        if not final:
            for k in range(min(len(tag) - 1, end - self._pos), 0, -1):
                if self._buf.endswith(tag[:k]):
                    end -= k
                    break
        self._send_text(out, end, final)
        return None

    def _begin_call(self, call: CallObject | NamedCall, start: int, pos: int) -> None:
        self._call, self._call_start, self._pos = call, start, pos
        self._sent_header, self._sent_parts = False, 0

    def _read_call(self, out: list[Delta], final: bool) -> bool:
        """Reads the call, sending its header and new argument text; True once it ends."""
        call = self._call
        assert call is not None
        try:
            self._pos = call.read(self._buf, self._pos, final)
        except NotACall:
            self._fail()
            return False
        if not self._sent_header and call.name is not None and call.args is not None:
            out.append(ToolCallDelta(self._num_calls, self._new_id(), call.name))
            self._num_calls += 1
            self._sent_header = True
        if self._sent_header and call.args is not None and \
                len(call.args.parts) > self._sent_parts:
            fragment = "".join(call.args.parts[self._sent_parts:])
            out.append(ToolCallDelta(self._num_calls - 1, arguments_fragment=fragment))
            self._sent_parts = len(call.args.parts)
        if call.done:
            self._call, self._after_call = None, True
        return call.done


class HermesToolParser(ToolParser):
    """<tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks (Qwen2.5, Qwen3,
    Hermes), any number, anywhere. Content is the text outside the blocks, except whitespace
    that only separates or follows them. A block ends where its JSON ends, so "</tool_call>"
    inside an argument string is just text; the last block may lack its closing tag, as
    vLLM takes it (max_tokens or a stop string ended the message)."""

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def _step(self, out: list[Delta], final: bool) -> bool:
        if self._state == "start":  # content, up to a <tool_call>
            at = self._scan_text(out, final, self.START)
            if at is None:
                return False
            self._begin_call(CallObject(), at, at + len(self.START))
            self._state = "call"
        elif self._state == "call":
            if not self._read_call(out, final):
                return False
            self._state = "close"
        else:  # "close": whitespace, then </tool_call>
            pos = self._pos = WHITESPACE.match(self._buf, self._pos).end()
            got = self._buf[pos:pos + len(self.END)]
            if got == self.END:
                self._pos, self._state = pos + len(self.END), "start"
            elif pos + len(got) == len(self._buf) and self.END.startswith(got):
                if final:  # an unclosed last call
                    self._pos = len(self._buf)
                return False
            else:
                return self._fail()
        return True


class Llama3JsonToolParser(ToolParser):
    """A message that is calls only: JSON objects {"name": ..., "parameters": {...}} (or
    "arguments"), separated by ";", optionally after <|python_tag|> (Llama 3.1-3.3). As in
    vLLM, a message that starts otherwise is content, and so is <|python_tag|> code."""

    name = "llama3_json"
    TAG = "<|python_tag|>"

    def _step(self, out: list[Delta], final: bool) -> bool:
        pos = WHITESPACE.match(self._buf, self._pos).end()
        rest = self._buf[pos:]
        if self._state == "start":  # leading whitespace is held until a call or text shows
            if rest.startswith(self.TAG) or rest.startswith("{"):
                skip = len(self.TAG) if rest.startswith(self.TAG) else 0
                self._begin_call(CallObject(), 0, pos + skip)
                self._state = "call"
            elif not final and self.TAG.startswith(rest):
                return False
            else:
                self._state = "plain"
        elif self._state == "call":
            if not self._read_call(out, final):
                return False
            self._state = "separator"
        elif rest.startswith(";"):  # "separator"
            self._begin_call(CallObject(), pos, pos + 1)
            self._state = "call"
        elif rest:
            return self._fail()
        else:
            if final:
                self._pos = pos
            return False
        return True


class MistralToolParser(ToolParser):
    """[TOOL_CALLS] then a JSON array of call objects (or one object), or the v11+ form
    [TOOL_CALLS]name[ARGS]{...}, repeated per call. Text before [TOOL_CALLS] is content, and
    so is text after the calls (whitespace only is dropped)."""

    name = "mistral"
    id_prefix, id_length = "", 9
    TAG = "[TOOL_CALLS]"
    _in_array = False  # inside [TOOL_CALLS][...]
    _first_item = True  # no call of this [TOOL_CALLS] read yet: a bad one falls back to the tag

    def _step(self, out: list[Delta], final: bool) -> bool:
        if self._state == "start":
            at = self._scan_text(out, final, self.TAG)
            if at is None:
                return False
            self._call_start, self._pos, self._sent_header = at, at + len(self.TAG), False
            self._state, self._first_item = "tag", True
            return True
        if self._state == "call":
            if not self._read_call(out, final):
                return False
            self._state = "array_after" if self._in_array else "start"
            return True
        pos = WHITESPACE.match(self._buf, self._pos).end()
        if pos == len(self._buf):
            return self._fail() if final else False
        c = self._buf[pos]
        if self._state == "tag":  # what follows [TOOL_CALLS]
            self._in_array = c == "["
            if self._in_array:
                self._pos, self._state = pos + 1, "array_item"
            else:
                call = CallObject() if c == "{" else NamedCall()
                self._begin_call(call, self._call_start, pos)
                self._state = "call"
        elif self._state == "array_item":
            start = self._call_start if self._first_item else pos
            self._begin_call(CallObject(), start, pos)
            self._state, self._first_item = "call", False
        elif c in ",]":  # "array_after"
            self._pos, self._state = pos + 1, "array_item" if c == "," else "start"
        else:
            return self._fail()
        return True


class PythonicToolParser(ToolParser):
    """A message that is one Python list of calls with literal keyword arguments,
    [f(a=1, b="x"), g()] (Llama 3.2, Llama 4; optionally between <|python_start|> and
    <|python_end|>), read with `ast`: tuples become lists, and a positional argument, a
    non-literal value or one JSON cannot hold (bytes, a set) makes the message content. As in
    vLLM, a message that starts otherwise is content. A list is only known to be calls once
    the message ends, so a stream holds it until `finish()`."""

    name = "pythonic"
    START, END = "<|python_start|>", "<|python_end|>"

    def _step(self, out: list[Delta], final: bool) -> bool:
        rest = self._buf[WHITESPACE.match(self._buf, self._pos).end():]
        if self._state == "start":
            if rest.startswith("[") or rest.startswith(self.START):
                self._state = "list"
            elif not final and self.START.startswith(rest):
                return False
            else:
                self._state = "plain"
            return True
        if not final:  # "list"
            return False
        calls = _pythonic_calls(self._buf)
        if calls is None:
            return self._fail()
        for index, (name, arguments) in enumerate(calls):
            out.append(ToolCallDelta(index, self._new_id(), name))
            out.append(ToolCallDelta(index, arguments_fragment=arguments))
        self._pos = len(self._buf)
        return False


def _pythonic_calls(text: str) -> list[tuple[str, str]] | None:
    """[(name, arguments JSON)] of a message that is a list of calls, else None."""
    body = text.strip()
    if body.startswith(PythonicToolParser.START):
        body = body[len(PythonicToolParser.START):].removesuffix(PythonicToolParser.END)
    try:
        tree = ast.parse(body.strip(), mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for call in tree.elts:
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or \
                    call.args or any(kw.arg is None for kw in call.keywords):
                return None
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
            calls.append((call.func.id, json.dumps(arguments, ensure_ascii=False,
                                                   allow_nan=False)))
        return calls
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser,
                                       MistralToolParser, PythonicToolParser)}


def pick_tool_parser(chat_template: str | None) -> str | None:
    """The parser a chat template makes clear (the tags it writes calls with), else None."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|python_start|>" in chat_template:
        return "pythonic"
    if "<|python_tag|>" in chat_template or "ipython" in chat_template:
        return "llama3_json"
    return None
