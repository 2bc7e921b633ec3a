"""Tool-call parsers: each format's calls read whole, and streamed in any chunking (one piece,
a character at a time, random pieces) to the same content and calls, with no tag text leaking
into content."""

from __future__ import annotations

import json
import random
import re

import pytest

from zomni.frontend.tool_parsers import (
    TOOL_PARSERS,
    ContentDelta,
    ParsedMessage,
    ToolCallDelta,
    pick_tool_parser,
)

TRICKY = {"city": "Paris </tool_call> <tool_call> [TOOL_CALLS] [ARGS] <|python_tag|>",
          "note": "quote \" backslash \\ tab \t newline \n ünïcode 世界 🌍", "n": 1.5,
          "list": [1, -2.5e-3, True, None, {"deep": []}], "empty": {}}

# parser -> [(text, content, [(name, arguments object)])]
VALID = {
    "hermes": [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
         None, [("get_weather", {"city": "Paris"})]),
        ("Let me check.\n\n<tool_call>\n" + json.dumps({"name": "f", "arguments": TRICKY})
         + "\n</tool_call>\n<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>\n",
         "Let me check.\n\n", [("f", TRICKY), ("g", {})]),
        ('<tool_call>{"arguments": {"x" :1 , "y":"\\u00e9\\ud83d\\ude00\\/"}, "name": "h"}'
         '</tool_call> Done.', " Done.", [("h", {"x": 1, "y": "é😀/"})]),
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n', None, [("f", {"a": 1})]),
        ("a < b <tool <tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1e2}}</tool_call>",
         "a < b <tool ", [("f", {"a": 100.0})]),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
         [("get_weather", {"city": "Paris"})]),
        ('<|python_tag|>{"name": "f", "parameters": ' + json.dumps(TRICKY)
         + '}; {"name": "g", "arguments": {"b": null}}', None, [("f", TRICKY), ("g", {"b": None})]),
        ('  \n{"type": "function", "name": "f", "parameters": {}}  ', None, [("f", {})]),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', None,
         [("get_weather", {"city": "Paris"})]),
        ('Sure. [TOOL_CALLS] [{"name": "f", "arguments": ' + json.dumps(TRICKY)
         + '}, {"name": "g", "arguments": {}}]', "Sure. ", [("f", TRICKY), ("g", {})]),
        ('[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]' + json.dumps(TRICKY), None,
         [("f", {"a": 1}), ("g", TRICKY)]),
        ('Hm [TOOL_[TOOL_CALLS]{"name": "f", "arguments": {"a": [1]}} after', "Hm [TOOL_ after",
         [("f", {"a": [1]})]),
    ],
    "pythonic": [
        ('[get_weather(city="Paris")]', None, [("get_weather", {"city": "Paris"})]),
        ("[f(a=1, b='x', c=[1, (2, 3)], d={'k': None}, e=True), g()]", None,
         [("f", {"a": 1, "b": "x", "c": [1, [2, 3]], "d": {"k": None}, "e": True}), ("g", {})]),
        ("<|python_start|>[f(s=" + repr(TRICKY["note"]) + ")]<|python_end|>", None,
         [("f", {"s": TRICKY["note"]})]),
    ],
}

# text that is no calls: all of it is content, from parse and from the stream
MALFORMED = {
    "hermes": ["no calls here", "<tool_call>not json</tool_call>",
               '<tool_call>{"name": "f", "arguments": {"a": 1}', "<tool_call>",
               '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
               '<tool_call>{"name": "f", "arguments": "{}"}</tool_call>',
               '<tool_call>{"arguments": {}}</tool_call>', ""],
    "llama3_json": ["Hello", 'Sure: {"name": "f", "parameters": {}}',
                    '{"name": "Bob", "age": 3}', "<|python_tag|>import sys",
                    '{"name": "f", "parameters": {"a": 1}', " ", "<|python"],
    "mistral": ["plain", "[TOOL_CALLS]", "[TOOL_CALLS][]", "[TOOL_CALLS]not json",
                '[TOOL_CALLS][{"name": "f"}]', "[TOOL_CALLS]f[ARG"],
    "pythonic": ["plain", "[1, 2]", "[f(1)]", "[f(a=x)]", "[f(a=1)] trailing", "see [link](u)",
                 "[f(a={1, 2})]", "[f(**k)]", "[]", "[f(a=1"],
}

TAGS = ["<tool_call", "tool_call>", "[TOOL_CALLS", "[ARGS", "<|python"]
CASES = [(p, *case) for p, cases in VALID.items() for case in cases]
BAD = [(p, text) for p, texts in MALFORMED.items() for text in texts]


def chunkings(text: str) -> list[list[str]]:
    """One piece, one character at a time, and seeded random pieces of 1 to 7 characters."""
    out = [[text], list(text)]
    for seed in range(5):
        rng, pieces, i = random.Random(seed), [], 0
        while i < len(text):
            n = rng.randint(1, 7)
            pieces.append(text[i:i + n])
            i += n
        out.append(pieces)
    return out


def stream(parser: str, pieces: list[str]) -> list:
    p = TOOL_PARSERS[parser]()
    deltas = [d for piece in pieces for d in p.feed(piece)]
    return deltas + p.finish()


def summary(msg: ParsedMessage) -> tuple:
    return msg.content, [(c.name, c.arguments) for c in msg.tool_calls]


@pytest.mark.parametrize("parser,text,content,calls", CASES)
def test_parse(parser, text, content, calls):
    msg = TOOL_PARSERS[parser].parse(text)
    assert msg.content == content
    assert [(c.name, json.loads(c.arguments)) for c in msg.tool_calls] == calls
    # the arguments rule: json.dumps of the object the model wrote
    assert [c.arguments for c in msg.tool_calls] == \
        [json.dumps(args, ensure_ascii=False) for _, args in calls]


@pytest.mark.parametrize("parser,text", BAD)
def test_malformed_is_content(parser, text):
    assert summary(TOOL_PARSERS[parser].parse(text)) == (text or None, [])


@pytest.mark.parametrize("parser,text,content,calls", CASES)
def test_stream_equals_parse(parser, text, content, calls):
    expected = summary(TOOL_PARSERS[parser].parse(text))
    for pieces in chunkings(text):
        deltas = stream(parser, pieces)
        assert summary(ParsedMessage.from_deltas(deltas)) == expected, pieces
        sent = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
        assert not any(tag in sent for tag in TAGS if tag not in (content or ""))
        check_shape([d for d in deltas if isinstance(d, ToolCallDelta)], len(calls))


@pytest.mark.parametrize("parser,text", BAD)
def test_stream_malformed_is_content(parser, text):
    """Text that goes bad before a call's header is sent comes out of the stream as content."""
    for pieces in chunkings(text):
        deltas = stream(parser, pieces)
        if any(isinstance(d, ToolCallDelta) for d in deltas):  # see test_stream_cut_off
            continue
        assert summary(ParsedMessage.from_deltas(deltas)) == (text or None, []), pieces


def check_shape(deltas: list[ToolCallDelta], num_calls: int) -> None:
    """OpenAI's stream shape: per call, a header with index, id and name, then fragments."""
    heads = [d for d in deltas if d.name is not None]
    assert [d.index for d in heads] == list(range(num_calls))
    seen: set[int] = set()
    for d in deltas:
        if d.name is not None:
            assert d.index not in seen and d.arguments_fragment is None
            assert d.to_openai() == {"index": d.index, "id": d.id, "type": "function",
                                     "function": {"name": d.name, "arguments": ""}}
            seen.add(d.index)
        else:
            assert d.index in seen and d.arguments_fragment and d.id is None
            assert d.to_openai() == {"index": d.index,
                                     "function": {"arguments": d.arguments_fragment}}


def test_ids():
    msg = TOOL_PARSERS["hermes"].parse(VALID["hermes"][1][0])
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in msg.tool_calls)
    assert len({c.id for c in msg.tool_calls}) == 2
    assert msg.tool_calls[0].to_openai()["function"]["name"] == "f"
    # Mistral's chat templates take back 9-alphanumeric ids only
    msg = TOOL_PARSERS["mistral"].parse(VALID["mistral"][0][0])
    assert re.fullmatch(r"[A-Za-z0-9]{9}", msg.tool_calls[0].id)


def test_hermes_streams_arguments_as_they_arrive():
    p = TOOL_PARSERS["hermes"]()
    assert p.feed("Hi <tool") == [ContentDelta("Hi ")]  # a tag prefix is held back
    assert p.feed('_call>{"name": "f", "argu') == []
    head = p.feed('ments": {"q": "ab')
    assert head[0].name == "f" and head[1].arguments_fragment == '{"q": "ab'
    assert p.feed('\\u00e9\\n') == [ToolCallDelta(0, arguments_fragment="é\\n")]
    assert p.feed('\\ud83d') == []  # half a surrogate pair waits for the other half
    assert p.feed('\\ude00"}}</tool_call>') == [ToolCallDelta(0, arguments_fragment='😀"}')]
    assert p.finish() == []


def test_held_tag_prefix_released_when_not_a_tag():
    p = TOOL_PARSERS["hermes"]()
    assert p.feed("x <tool_c") == [ContentDelta("x ")]
    assert p.feed("ar") == [ContentDelta("<tool_car")]
    p = TOOL_PARSERS["mistral"]()
    assert p.feed("[TOOL") == []
    assert p.finish() == [ContentDelta("[TOOL")]


def test_stream_cut_off():
    """A call cut off after its header went out stands as sent; parse calls it content."""
    text = '<tool_call>{"name": "f", "arguments": {"a": "long'
    deltas = stream("hermes", list(text))
    msg = ParsedMessage.from_deltas(deltas)
    assert msg.content is None and [(c.name, c.arguments) for c in msg.tool_calls] == \
        [("f", '{"a": "long')]
    assert summary(TOOL_PARSERS["hermes"].parse(text)) == (text, [])


def test_pythonic_holds_until_finish():
    p = TOOL_PARSERS["pythonic"]()
    assert p.feed('[f(a="x")]') == []
    assert [d.name or d.arguments_fragment for d in p.finish()] == ["f", '{"a": "x"}']
    p = TOOL_PARSERS["pythonic"]()
    assert p.feed("  Hello") == [ContentDelta("  Hello")]


def test_repeated_key_keeps_both_members():
    msg = TOOL_PARSERS["hermes"].parse(
        '<tool_call>{"name": "f", "arguments": {"a": 1, "a": 2}}</tool_call>')
    assert msg.tool_calls[0].arguments == '{"a": 1, "a": 2}'


@pytest.mark.parametrize("template,expected", [
    ("{% for tool in tools %}<tools>{{ tool }}</tools>{% endfor %}<tool_call>\n", "hermes"),
    ("{{ '[AVAILABLE_TOOLS]' }}{% if message.tool_calls %}[TOOL_CALLS]{% endif %}", "mistral"),
    ("<|start_header_id|>ipython<|end_header_id|>", "llama3_json"),
    ("{{- '<|python_tag|>' + tool_call.name }}", "llama3_json"),
    ("<|python_start|>[func(a=1)]<|python_end|> ipython", "pythonic"),
    ("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}", None),
    (None, None),
])
def test_pick_tool_parser(template, expected):
    assert pick_tool_parser(template) == expected


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([True, False, None, 0, -7, 10**20, 3.25, -1e-7, 1e300])
    if kind in (1, 2, 3):
        chars = 'ab "\\/\n\t\x01é世🌍<>[]{}:,'
        return "".join(rng.choice(chars) for _ in range(rng.randrange(6)))
    if kind in (4, 5):
        return {"k" + str(i) + rng.choice('"é'): random_json(rng, depth + 1)
                for i in range(rng.randrange(4))}
    return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


@pytest.mark.parametrize("seed", range(20))
def test_arguments_are_json_dumps_of_any_json(seed):
    """Random arguments, written with random spacing and escaping, streamed in random pieces,
    come out as json.dumps(arguments, ensure_ascii=False)."""
    rng = random.Random(seed)
    args = {"x": random_json(rng)}
    raw = json.dumps(args, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 0, 2]),
                     separators=rng.choice([None, (",", ":"), (" ,", " : ")]))
    text = f'<tool_call>{{"name": "f", "arguments": {raw}}}</tool_call>'
    expected = json.dumps(args, ensure_ascii=False)
    assert TOOL_PARSERS["hermes"].parse(text).tool_calls[0].arguments == expected
    for pieces in chunkings(text)[1:3]:
        assert ParsedMessage.from_deltas(stream("hermes", pieces)).tool_calls[0].arguments \
            == expected
