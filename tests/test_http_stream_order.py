"""Streams of several choices (`n > 1`, a list of prompts) over HTTP: each choice's chunks are
in order, its `finish_reason` comes on its last chunk only, and every chunk's text matches the
tokens and logprobs it carries.

The choices' engine streams are merged into one; a chunk must describe one engine output as it
was when it arrived, even if that choice's later outputs were folded in before the chunk was
written (the frontend lags the engine whenever several outputs are buffered). The scripted
model makes every greedy choice the known token chain, so each chunk can be checked exactly:
after the chunks of a choice carrying m tokens, its text is the chain's first m tokens decoded,
less a trailing incomplete character (held back until it completes).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from http_utils import EOS_ID, SCRIPT_TEXT, http, scripted_model, start_serve

REPEATS = 12  # each request shape, 4 at a time: enough for the race to show before its fix


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import AutoTokenizer

    model, chain, start = scripted_model(tmp_path_factory)
    proc = start_serve(model, tmp_path_factory.mktemp("serve-order") / "serve.log")
    try:
        proc.wait_healthy()
        tok = AutoTokenizer.from_pretrained(model)
        ids = [*chain, EOS_ID]
        yield SimpleNamespace(
            url=proc.base_url, model=str(model), start=start, num_tokens=len(ids),
            token_texts=[tok.decode([t]) for t in ids],
            # text after m tokens: decoded, an incomplete last character held back
            text_after=[tok.decode(chain[:m]).rstrip("\ufffd") for m in range(len(ids))]
            + [SCRIPT_TEXT])
    finally:
        proc.kill()


def sse_chunks(url: str, body: dict) -> list[dict]:
    status, _, data = http("POST", url, body, {"Content-Type": "application/json"}, timeout=60)
    assert status == 200, data
    events = [line[len("data: "):] for line in data.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def by_choice(chunks: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for chunk in chunks:
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            out.setdefault(choice["index"], []).append(choice)
    return out


def check_choice(server, choices: list[dict], text_of, tokens_of) -> None:
    """One choice's chunks: each carries >= 1 token and the text those tokens complete, and
    only the last one a finish reason."""
    text, tokens = "", []
    for k, choice in enumerate(choices):
        new = tokens_of(choice)
        assert new, f"chunk {k} carries no token: {choice}"
        tokens += new
        text += text_of(choice)
        assert len(tokens) <= server.num_tokens, choices
        assert text == server.text_after[len(tokens)], (k, choices)
        assert (choice["finish_reason"] is None) == (k < len(choices) - 1), (k, choices)
    assert tokens == server.token_texts and text == SCRIPT_TEXT
    assert choices[-1]["finish_reason"] == "stop"


def completion_tokens(choice: dict) -> list[str]:
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) \
        == len(lp["text_offset"])
    return lp["tokens"]


def chat_tokens(choice: dict) -> list[str]:
    return [t["token"] for t in choice["logprobs"]["content"]]


def run_many(server, path: str, body: dict) -> list[list[dict]]:
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda _: sse_chunks(server.url + path, body), range(REPEATS)))


@pytest.mark.parametrize("shape", ["n4", "prompt_list"])
def test_completion_streams_keep_each_choice_in_order(server, shape):
    prompts = {"n4": ([5, 6, server.start], 4),
               "prompt_list": ([[5, 6, server.start], [7, server.start]], 2)}
    prompt, n = prompts[shape]
    body = {"model": server.model, "prompt": prompt, "n": n, "max_tokens": 50,
            "temperature": 0, "logprobs": 1, "stream": True}
    for chunks in run_many(server, "/v1/completions", body):
        choices = by_choice(chunks)
        assert sorted(choices) == list(range(4))
        for per_choice in choices.values():
            check_choice(server, per_choice, lambda c: c["text"], completion_tokens)


def test_chat_stream_keeps_each_choice_in_order(server):
    body = {"model": server.model, "messages": [{"role": "user", "content": "x"}], "n": 4,
            "temperature": 0, "logprobs": True, "top_logprobs": 1, "stream": True}
    for chunks in run_many(server, "/v1/chat/completions", body):
        choices = by_choice(chunks)
        assert sorted(choices) == list(range(4))
        for per_choice in choices.values():
            assert per_choice[0]["delta"]["role"] == "assistant"
            check_choice(server, per_choice, lambda c: c["delta"].get("content") or "",
                         chat_tokens)
