"""A seeded HTTP fuzzer against a running `zomni serve`: a few hundred bad requests, each
answered with a 4xx and OpenAI error JSON (never a 5xx, a bare text body or a dropped
connection); afterwards the server still serves the scripted model's exact reply.

Every case is bad by construction, whatever the server's checks are: a wrong type is one
that msgspec cannot convert to the field's declared type, a bad number is out of every
field's range, a mutated body is no longer JSON. The categories (`build_cases`):

    bytes      random bytes; valid bodies truncated or with a byte no JSON text may hold
    utf8       invalid UTF-8 (stray, overlong, surrogate-coded bytes) in JSON strings
    nesting    ~1000-deep arrays and objects in fields, in ignored fields, as the body
    types      a wrong-typed value for every field of every body (and of a chat message)
    ints       integers past 64 bits in every integer field and in token-id lists
    floats     NaN, ±Infinity, ±1e39, ±1e400 in every float field
    strings    huge strings: over the body limit anywhere, over the context in prompts
    semantic   well-formed but wrong: n=200000, 10^5 prompts, max_tokens -1, 10^4 stop
               strings, bad logit_bias keys, unsupported options, unknown models ...
    encoding   gzip / deflate bombs past the body limit, corrupt and unknown encodings
    framing    bad chunked framing, a Content-Length shorter than the body
    routes     wrong API key, unknown paths, wrong methods

Any of them may also carry a wrong or missing Content-Type (the server reads JSON whatever
the header says, as curl users need: so only a bad body makes a case bad).
"""

from __future__ import annotations

import gzip
import json
import random
import time
import typing
import zlib
from http.client import HTTPConnection, HTTPException
from types import SimpleNamespace
from typing import Any, NamedTuple

import msgspec
import pytest
from http_utils import SCRIPT_TEXT, http, scripted_model, start_serve

from zomni.frontend import openai_protocol as oai
from zomni.frontend.image_protocol import ImageGenerationRequest
from zomni.proto.model_info import read_model_info

SEED = 0
KEY = "sk-fuzz"
BODY_LIMIT_MB = 2
BODY_LIMIT = BODY_LIMIT_MB << 20
AUTH = {"Authorization": f"Bearer {KEY}"}
# path -> the body it decodes into
STRUCTS: dict[str, type[msgspec.Struct]] = {
    "/v1/completions": oai.CompletionRequest,
    "/v1/chat/completions": oai.ChatCompletionRequest,
    "/tokenize": oai.TokenizeRequest,
    "/detokenize": oai.DetokenizeRequest,
    "/v1/images/generations": ImageGenerationRequest,  # an LLM-only server: always a 4xx
}
CONTENT_TYPES = [None, "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=zz", "application/json; charset=latin-1",
                 "a/b/c;;;", "application/json"]
# values of every JSON type; a field's wrong ones are those msgspec will not convert
TYPE_POOL: list[Any] = ["x", "", 0, -1, 1.5, True, None, [], [1], ["x"], [[1]], {}, {"a": 1},
                        [{}], [None]]
BIG_INTS = [2**64, -(2**64), 2**63, -(2**63) - 1, 10**30, 2**200]
BAD_FLOATS = ["NaN", "-NaN", "Infinity", "-Infinity", "1e39", "-1e39", "1e400", "-1e400"]
_RAW = "@@raw@@"


class Case(NamedTuple):
    category: str
    path: str
    body: bytes
    headers: dict[str, str | None]
    method: str = "POST"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model, chain, start = scripted_model(tmp_path_factory)
    log = tmp_path_factory.mktemp("serve-fuzz") / "serve.log"
    # a 1 s body timeout: a chunked body that stops short is a 408 without a long wait
    proc = start_serve(model, log, "--api-key", KEY, "--max-request-body-mb",
                       str(BODY_LIMIT_MB), "--body-timeout-s", "1")
    try:
        proc.wait_healthy()
        details = read_model_info(str(model)).details
        yield SimpleNamespace(proc=proc, url=proc.base_url, model=str(model), chain=chain,
                              start=start, vocab=details.vocab_size,
                              max_model_len=details.max_model_len)
    finally:
        proc.kill()


def with_raw(body: dict[str, Any], field: str, literal: str) -> bytes:
    """`body` as JSON with `field` set to the JSON text `literal` (NaN, 1e400, [[[...]]])."""
    return json.dumps({**body, field: _RAW}).replace(json.dumps(_RAW), literal).encode()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)  # the same bytes every run


def dumps(body: Any) -> bytes:
    return json.dumps(body).encode()


def field_types(cls: type[msgspec.Struct]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in cls.__struct_fields__}


def converts(value: Any, hint: Any) -> bool:
    try:
        msgspec.convert(value, hint)
    except msgspec.ValidationError:
        return False
    return True


def base_bodies(s) -> dict[str, dict[str, Any]]:
    """A valid body per path (but the images one, which an LLM server refuses anyway)."""
    return {
        "/v1/completions": {"model": s.model, "prompt": [5, 6, s.start], "max_tokens": 2},
        "/v1/chat/completions": {"model": s.model, "max_tokens": 2,
                                 "messages": [{"role": "user", "content": "x"}]},
        "/tokenize": {"model": s.model, "prompt": "hello"},
        "/detokenize": {"model": s.model, "tokens": [5, 6]},
        "/v1/images/generations": {"prompt": "a cat"},
    }


# ---- the cases, by category -------------------------------------------------------------------


def byte_cases(rng: random.Random, bases: dict[str, dict]) -> list[tuple[str, bytes]]:
    cases = []
    for _ in range(16):
        cases.append((rng.choice(list(STRUCTS)), rng.randbytes(rng.randrange(1, 4096))))
    # Control bytes: no JSON text holds them, in a string or out of one (a "}" in a key is
    # still JSON). Not bad UTF-8 here: msgspec skips an unknown key or value unread, so
    # `{"ma\xffx_tokens": 2}` is taken as `{}` (the utf8 cases put it in fields it reads).
    not_json = [b"\x00", b"\x01", b"\x08", b"\x1f"]
    for _ in range(24):
        path = rng.choice(list(STRUCTS))
        good = dumps(bases[path])
        if rng.random() < 0.4:
            cases.append((path, good[:rng.randrange(len(good) - 1)]))  # truncated
        else:
            at = rng.randrange(1, len(good) - 1)
            cases.append((path, good[:at] + rng.choice(not_json) + good[at:]))
    return cases


def utf8_cases(rng: random.Random, bases: dict[str, dict]) -> list[tuple[str, bytes]]:
    bad = [b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf8\x88",
           b"\x80", b"\xe6\x97", b"\xf4\x90\x80\x80"]
    targets = {"/v1/completions": "prompt", "/tokenize": "prompt",
               "/v1/images/generations": "prompt", "/v1/chat/completions": "model"}
    cases = []
    for _ in range(16):
        path = rng.choice(list(targets))
        literal = b'"a' + rng.choice(bad) + b'b"'
        cases.append((path, with_raw(bases[path], targets[path], "@@").replace(b"@@", literal)))
    cases.append(("/tokenize", rb'{"prompt": "\ud800"}'))  # a lone surrogate, escaped
    cases.append(("/v1/chat/completions", b'{"messages": [{"role": "user", "content": '
                                          rb'"\udfff\ud800"}]}'))
    cases.append(("/tokenize", '{"prompt": "é"}'.encode("latin-1")))
    return cases


def nesting_cases(rng: random.Random, bases: dict[str, dict]) -> list[tuple[str, bytes]]:
    fields = {"/v1/completions": ["prompt", "n", "stop", "logit_bias", "temperature",
                                  "stop_token_ids"],
              "/v1/chat/completions": ["messages", "stop", "tools", "stream_options"],
              "/tokenize": ["prompt", "messages"], "/detokenize": ["tokens"],
              "/v1/images/generations": ["prompt", "class_labels", "cache"]}
    cases = []
    for _ in range(24):
        path = rng.choice(list(fields))
        depth = rng.choice([rng.randint(900, 1100), 5000, 100_000])
        arrays = rng.random() < 0.6
        literal = "[" * depth + "]" * depth if arrays else '{"a":' * depth + "1" + "}" * depth
        body = bases[path]
        field = rng.choice(fields[path] + ["ignored"])
        if field == "ignored":  # an unknown field, skipped by the decoder; n=0 is bad anyway
            body = {**body, "n": 0} if path != "/detokenize" else {"tokens": [-1]}
        cases.append((path, with_raw(body, field, literal)))
    cases.append(("/v1/completions", ("[" * 1000 + "]" * 1000).encode()))  # the body itself
    cases.append(("/v1/chat/completions", ('{"a":' * 1000 + "1" + "}" * 1000).encode()))
    return cases


def type_cases(rng: random.Random, bases: dict[str, dict]) -> list[tuple[str, bytes]]:
    cases = []
    for path, cls in STRUCTS.items():
        for field, hint in field_types(cls).items():
            wrong = [v for v in TYPE_POOL if not converts(v, hint)]
            if wrong:
                cases.append((path, dumps({**bases[path], field: rng.choice(wrong)})))
    for field, hint in field_types(oai.ChatMessage).items():
        wrong = [v for v in TYPE_POOL if not converts(v, hint)]
        for path in ("/v1/chat/completions", "/tokenize"):
            message = {"role": "user", "content": "x", field: rng.choice(wrong)}
            body = {k: v for k, v in bases[path].items() if k != "prompt"}
            cases.append((path, dumps({**body, "messages": [message]})))
    return cases


def int_cases(rng: random.Random, bases: dict[str, dict]) -> list[tuple[str, bytes]]:
    cases = []
    for path, cls in STRUCTS.items():
        for field, hint in field_types(cls).items():
            big = rng.choice(BIG_INTS)
            if converts(1, hint) and not converts(1.5, hint):  # an integer
                cases.append((path, dumps({**bases[path], field: big})))
            elif converts([1], hint) and not converts([1.5], hint):  # a list of them
                cases.append((path, dumps({**bases[path], field: [1, big]})))
    for prompt in ([rng.choice(BIG_INTS)], [5, 2**64], [[5], [-(2**64)]], [[2**63, 5]]):
        cases.append(("/v1/completions", dumps({**bases["/v1/completions"], "prompt": prompt})))
    cases.append(("/v1/completions", dumps({**bases["/v1/completions"],
                                            "logit_bias": {str(2**64): 1}})))
    return cases


def float_cases(rng: random.Random, bases: dict[str, dict]) -> list[tuple[str, bytes]]:
    cases = []
    for path, cls in STRUCTS.items():
        for field, hint in field_types(cls).items():
            if converts(1.5, hint) and not converts("x", hint) and not converts([1.5], hint):
                for literal in rng.sample(BAD_FLOATS, 3):
                    cases.append((path, with_raw(bases[path], field, literal)))
    cases.append(("/v1/completions", with_raw(bases["/v1/completions"], "logit_bias",
                                              '{"5": 1e39}')))
    return cases


def string_cases(rng: random.Random, bases: dict[str, dict], s) -> list[tuple[str, bytes]]:
    over_body = "x" * (BODY_LIMIT + 1000)
    over_context = "ab" * (32 * s.max_model_len + 1000)  # past 64 characters per token
    chat = {"/v1/chat/completions": "messages", "/tokenize": "messages"}
    cases = []
    for path in STRUCTS:
        field = rng.choice(["prompt", "model", "user", "stop", "whatever"])
        cases.append((path, dumps({**bases[path], field: over_body})))
    for path in ("/v1/completions", "/tokenize"):
        cases.append((path, dumps({**bases[path], "prompt": over_context})))
        cases.append((path, dumps({**bases[path], "model": "m" * 200_000})))
    for path, field in chat.items():
        body = {k: v for k, v in bases[path].items() if k != "prompt"}
        cases.append((path, dumps({**body, field: [{"role": "user", "content": over_context}]})))
    cases.append(("/v1/completions", dumps({**bases["/v1/completions"],
                                            "prompt": [over_context, "x"]})))
    return cases


def semantic_cases(s, bases: dict[str, dict]) -> list[tuple[str, dict[str, Any]]]:
    cmpl, chat = bases["/v1/completions"], bases["/v1/chat/completions"]
    tok, detok = bases["/tokenize"], bases["/detokenize"]
    shared = [
        {"n": 200_000}, {"n": 0}, {"n": -1}, {"max_tokens": -1}, {"max_tokens": 10**9},
        {"stop": ["s"] * 10**4}, {"stop_token_ids": [7] * 10**5}, {"temperature": -1},
        {"temperature": 101}, {"top_p": 0}, {"top_p": 1.01}, {"top_k": -2}, {"min_p": 2},
        {"repetition_penalty": 0}, {"frequency_penalty": 3}, {"presence_penalty": -3},
        {"min_tokens": -1}, {"min_tokens": 3, "max_tokens": 2}, {"prompt_logprobs": 21},
        {"prompt_logprobs": -1}, {"stream_options": {"include_usage": True}},
        {"stream": True, "prompt_logprobs": 1}, {"model": "no-such-model"},
        {"logit_bias": {"abc": 1}}, {"logit_bias": {"-1": 1}}, {"logit_bias": {"1e3": 1}},
        {"logit_bias": {"99999999999999999999": 1}}, {"logit_bias": {str(s.vocab): 1}},
        {"logit_bias": {"": 1}}, {"logit_bias": {" 5": 1}}, {"logit_bias": {"5": 101}},
        {"logit_bias": {"5": "x"}}, {"logit_bias": {"5": True}}, {"logit_bias": {"5": None}},
        {"logit_bias": {"5": [1]}}, {"logit_bias": {str(i): 1 for i in range(301)}},
    ]
    completions = [
        {"prompt": ["x"] * 10**5}, {"prompt": [[5]] * 10**5}, {"prompt": [5] * 10**5},
        {"prompt": []}, {"prompt": [[]]}, {"prompt": [-1]}, {"prompt": [s.vocab]},
        {"prompt": [1, "x"]}, {"prompt": [[1], "x"]}, {"prompt": [True]}, {"logprobs": 21},
        {"best_of": 1, "n": 2}, {"best_of": 200}, {"best_of": 2, "stream": True},
        {"max_tokens": 0}, {"suffix": "x"}, {"echo": True, "max_tokens": 0, "n": 10**5},
    ]
    chats = [
        {"messages": [{"role": "wizard", "content": "x"}]}, {"messages": [{"content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"tools": [{"type": "function"}]}, {"tool_choice": "auto"},
        {"response_format": {"type": "json_object"}}, {"functions": [{"name": "f"}]},
        {"top_logprobs": 5}, {"logprobs": True, "top_logprobs": 21},
        {"max_completion_tokens": -1}, {"max_completion_tokens": 10**9},
        {"chat_template_kwargs": {"tokenize": True}},
        {"chat_template_kwargs": {"chat_template": "{{ 7 * 7 }}"}},
    ]
    return ([("/v1/completions", {**cmpl, **c}) for c in shared + completions]
            + [("/v1/chat/completions", {**chat, **c}) for c in shared + chats]
            + [("/tokenize", {**tok, "messages": chat["messages"]}),
               ("/tokenize", {"model": s.model}), ("/tokenize", {"prompt": "x", "model": "?"}),
               ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}),
               ("/detokenize", {}), ("/detokenize", {**detok, "tokens": [-1]}),
               ("/detokenize", {**detok, "tokens": [s.vocab]}),
               ("/detokenize", {**detok, "tokens": [5] * 10**5 + [s.vocab]}),
               ("/v1/images/generations", {"prompt": "a cat", "n": 10**5}),
               ("/v1/images/generations", {"prompt": "a cat", "size": "9x9x9"})])


def encoding_cases(bases: dict[str, dict]) -> list[Case]:
    inflated = b'{"prompt": "' + b" " * (BODY_LIMIT + (1 << 20)) + b'"}'
    bombs = {"gzip": gz(inflated), "deflate": zlib.compress(inflated)}
    cases = []
    for path in STRUCTS:
        for name, bomb in bombs.items():
            cases.append(Case("encoding", path, bomb, {"Content-Encoding": name}))
    good = dumps(bases["/tokenize"])
    corrupt = [("gzip", b"not gzip at all"), ("gzip", gz(good)[:20]),
               ("deflate", b"\x78\x9c\xff\xff"), ("gzip", gz(b"\xff" + good)),
               ("gzip, gzip", gz(gz(inflated))),
               ("br", b"\x0b\x02\x80garbage"), ("zstd", b"\x28\xb5\x2f\xfdgarbage"),
               ("x-unknown", b"{"), ("gzip", gz(gz(good)))]
    for name, body in corrupt:
        cases.append(Case("encoding", "/tokenize", body, {"Content-Encoding": name}))
    return cases


def framing_cases(bases: dict[str, dict]) -> list[Case]:
    chunked = {"Transfer-Encoding": "chunked"}
    good = dumps(bases["/tokenize"])
    return [Case("framing", "/tokenize", b"zz\r\n" + good + b"\r\n0\r\n\r\n", chunked),
            Case("framing", "/tokenize", b"%x\r\n" % (len(good) + 50) + good + b"\r\n0\r\n\r\n",
                 chunked),
            Case("framing", "/tokenize", b"-5\r\nabc\r\n0\r\n\r\n", chunked),
            Case("framing", "/tokenize", b"ffffffffffffffffff\r\n" + good, chunked),
            Case("framing", "/tokenize", good, {"Content-Length": str(len(good) - 3)})]


def route_cases(bases: dict[str, dict]) -> list[Case]:
    good = dumps(bases["/tokenize"])
    cases = [Case("routes", "/tokenize", good, {"Authorization": auth})
             for auth in ("", "Bearer", f"Bearer {KEY}x", f"bearer {KEY}", KEY, "Basic eA==")]
    cases.append(Case("routes", "/tokenize", good, {"Authorization": None}))
    for method, path in [("GET", "/v1/completions"), ("PUT", "/v1/chat/completions"),
                         ("DELETE", "/tokenize"), ("POST", "/v1/models"), ("GET", "/nowhere"),
                         ("POST", "/v1/completions/x"), ("GET", "/v1/models/" + "m" * 5000),
                         ("GET", "/v1/models/%00%ff"), ("POST", "/v1/embeddings"),
                         ("GET", "/v1/../etc/passwd"), ("PATCH", "/health")]:
        cases.append(Case("routes", path, b"{}", {}, method))
    return cases


def build_cases(s) -> list[Case]:
    rng = random.Random(SEED)
    bases = base_bodies(s)
    bodies = [("bytes", byte_cases(rng, bases)), ("utf8", utf8_cases(rng, bases)),
              ("nesting", nesting_cases(rng, bases)), ("types", type_cases(rng, bases)),
              ("ints", int_cases(rng, bases)), ("floats", float_cases(rng, bases)),
              ("strings", string_cases(rng, bases, s)),
              ("semantic", [(p, dumps(b)) for p, b in semantic_cases(s, bases)])]
    cases = [Case(category, path, body, {"Content-Type": rng.choice(CONTENT_TYPES)})
             for category, pairs in bodies for path, body in pairs]
    cases += encoding_cases(bases) + framing_cases(bases) + route_cases(bases)
    return cases


# ---- sending and checking ---------------------------------------------------------------------


def send(port: int, case: Case) -> tuple[int, str, bytes]:
    """(status, Content-Type, body); status 0 with the exception for no answer at all."""
    headers = {**AUTH, **case.headers}
    headers = {k: v for k, v in headers.items() if v is not None}  # None: not sent
    if "Transfer-Encoding" not in headers:
        headers.setdefault("Content-Length", str(len(case.body)))
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(case.method, case.path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(case.body)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    except (OSError, HTTPException) as e:
        return 0, "", repr(e).encode()
    finally:
        conn.close()


def problem(status: int, content_type: str, data: bytes) -> str | None:
    """What is wrong with the answer to a bad request, or None."""
    if not 400 <= status < 500:
        return f"status {status}: {data[:200]!r}"
    if not content_type.startswith("application/json"):
        return f"{status} with Content-Type {content_type!r}: {data[:200]!r}"
    try:
        error = json.loads(data)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} without an error object: {data[:200]!r}"
    if set(error) != {"message", "type", "param", "code"} or error["code"] != status \
            or not error["message"] or not isinstance(error["type"], str):
        return f"{status} with a malformed error object: {error}"
    return None


def idle(url: str, timeout: float = 20.0) -> bool:
    """Whether the engine runs and queues nothing (polled for up to `timeout` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, data = http("GET", url + "/stats", headers=AUTH)
        stats = json.loads(data) if status == 200 else {}
        if stats.get("num_running") == 0 and stats.get("num_waiting") == 0:
            return True
        time.sleep(0.1)
    return False


def test_fuzz_bad_requests_are_4xx_openai_json(server):
    cases = build_cases(server)
    assert len(cases) >= 300
    failures = []
    for case in cases:
        found = problem(*send(server.proc.port, case))
        if found is not None:
            failures.append(f"[{case.category}] {case.method} {case.path} "
                            f"{case.body[:80]!r} {case.headers}: {found}")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures[:30])

    # ... and the server still serves, exactly, with nothing left running
    assert server.proc.proc.poll() is None
    assert http("GET", server.url + "/health")[0] == 200
    status, _, data = http("POST", server.url + "/v1/completions",
                           {"model": server.model, "prompt": [5, 6, server.start],
                            "max_tokens": 50, "temperature": 0},
                           {**AUTH, "Content-Type": "application/json"})
    assert status == 200, data
    choice = json.loads(data)["choices"][0]
    assert choice["text"] == SCRIPT_TEXT and choice["finish_reason"] == "stop"
    status, _, data = http("POST", server.url + "/v1/chat/completions",
                           {"model": server.model, "stream": True, "max_tokens": 4,
                            "temperature": 0, "messages": [{"role": "user", "content": "x"}]},
                           {**AUTH, "Content-Type": "application/json"})
    events = [e.removeprefix("data: ") for e in data.decode().split("\n\n") if e]
    assert status == 200 and events[-1] == "[DONE]", data
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert idle(server.url), "requests are left in the engine"
    assert "Traceback" not in server.proc.log.read_text(errors="replace")
