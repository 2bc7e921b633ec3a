"""proto/SCHEMA.md is what writers of clients in other languages read: it must say what the
code speaks (version, schema hash, every struct's fields in order, its kind tag, message type
bytes), and its examples must decode."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest

from zomni.proto import PROTOCOL_VERSION, SCHEMA_HASH, MsgType, decode, messages, sampling

SCHEMA = (Path(messages.__file__).parent / "SCHEMA.md").read_text()


def _sections() -> dict[str, tuple[int | None, list[str]]]:
    """`### Name [(tag N, ...)]` → (tag, field names of its `| # | field |` table, in order)."""
    found = {}
    for block in re.split(r"^### ", SCHEMA, flags=re.M)[1:]:
        title, _, body = block.partition("\n")
        m = re.match(r"(\w+)(?: \(tag (\d+)\b.*\))?$", title.strip())
        if not m or "| # | field |" not in body:
            continue
        rows = re.findall(r"^\| (\d+) \| (\w+) \|", body, flags=re.M)
        assert [int(i) for i, _ in rows] == list(range(len(rows))), f"{title}: indices"
        found[m.group(1)] = (int(m.group(2)) if m.group(2) else None, [f for _, f in rows])
    return found


def _wire_structs() -> dict[str, type[msgspec.Struct]]:
    """Every struct that can appear in a message body, reached from the message tables."""
    seen: dict[str, type[msgspec.Struct]] = {}

    def visit(t) -> None:
        if isinstance(t, msgspec.inspect.StructType):
            if t.cls.__name__ in seen:
                return
            seen[t.cls.__name__] = t.cls
            for f in t.fields:
                visit(f.type)
        for attr in ("item_type", "key_type", "value_type"):
            if hasattr(t, attr):
                visit(getattr(t, attr))
        for member in getattr(t, "types", ()):
            visit(member)

    for body in {**messages.CLIENT_MESSAGES, **messages.WORKER_MESSAGES}.values():
        visit(msgspec.inspect.type_info(body))
    return seen


def test_version_and_hash_are_current():
    m = re.search(r"Protocol version \*\*(\d+)\*\*, schema hash \*\*`([0-9a-f]+)`\*\*", SCHEMA)
    assert m, "SCHEMA.md must state the protocol version and schema hash"
    assert (int(m.group(1)), m.group(2)) == (PROTOCOL_VERSION, SCHEMA_HASH), (
        "SCHEMA.md is stale: update its tables, version and hash")
    # every example HELLO carries the current hash too
    for version, hash_ in re.findall(r'HELLO\s+01\s+\[(\d+), "([0-9a-f]+)"', SCHEMA):
        assert (int(version), hash_) == (PROTOCOL_VERSION, SCHEMA_HASH)


def test_every_struct_is_documented_field_by_field():
    documented = _sections()
    structs = _wire_structs()
    structs.pop("Empty")  # documented as "no fields"
    assert "### Empty" in SCHEMA
    assert sorted(documented) == sorted(structs)
    for name, cls in structs.items():
        tag, fields = documented[name]
        assert fields == list(cls.__struct_fields__), f"{name}: fields or their order"
        assert tag == cls.__struct_config__.tag, f"{name}: kind tag"


def test_message_type_bytes():
    rows = dict(re.findall(r"^\| (\d+) \| ([A-Z_]+) \|", SCHEMA, flags=re.M))
    assert {int(t): t.name for t in MsgType} == {int(b): n for b, n in rows.items()}


@pytest.mark.parametrize("line", re.findall(r"^([A-Z]+ +[0-9a-f]{2} +\[.*\])", SCHEMA, re.M))
def test_examples_decode(line: str):
    name, hex_type, body = line.split(maxsplit=2)
    # an example ends at its last closing bracket; what follows is a comment
    body = body[:body.rindex("]") + 1]
    msg_type = MsgType(int(hex_type, 16))
    assert msg_type.name == name
    frames = [bytes((msg_type,)), msgspec.msgpack.encode(json.loads(body))]
    if "uint8" in body:  # the image output example names one extra frame of pixels
        frames.append(bytes(2 * 32 * 32 * 3))
    decoded_type, msg, _ = decode(frames)
    assert decoded_type == msg_type
    if isinstance(msg, messages.EngineRequest):
        assert msg.sampling == sampling.SamplingParams(max_tokens=4, temperature=0.0)
    if isinstance(msg, messages.ImageRequest):
        assert msg.params == sampling.ImageParams(n=2, seed=7)
