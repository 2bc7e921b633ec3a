"""Incremental detokenization: streamed text is the text of the whole output, on both paths
(the `tokenizers` DecodeStream and the Python window), however the tokens are chunked."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from zomni.frontend.detokenizer import IncrementalDetokenizer

DEMO = Path(__file__).resolve().parent.parent / "zomni" / "demo_model"
TEXT = "Grüße, 世界! Ein Test 🌍🚀 mit ñ und ümlauts, and plain ascii words too."


class WindowOnly:
    """A tokenizer without a `tokenizers` backend: the detokenizer's Python window path."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO)


def stream(tokenizer, prompt: list[int], output: list[int], window: bool, seed: int = 0,
           **kwargs) -> IncrementalDetokenizer:
    detok = IncrementalDetokenizer(WindowOnly(tokenizer) if window else tokenizer, prompt,
                                   **kwargs)
    assert (detok._stream is None) == window
    rng, i = random.Random(seed), 0
    while i < len(output) and detok.stop_reason is None:
        step = rng.randint(1, 4)  # a step may bring several tokens (speculative, n-gram)
        detok.add_tokens(output[i:i + step])
        i += step
    detok.flush()
    return detok


@pytest.mark.parametrize("window", [False, True], ids=["stream", "window"])
def test_random_tokens_decode_as_a_whole(tokenizer, window):
    # Random ids split characters across tokens and put special tokens anywhere.
    for seed in range(40):
        rng = random.Random(seed)
        ids = [rng.randrange(len(tokenizer)) for _ in range(120)]
        detok = stream(tokenizer, ids[:10], ids[10:], window, seed)
        assert detok.text == tokenizer.decode(ids[10:], skip_special_tokens=True), seed


@pytest.mark.parametrize("window", [False, True], ids=["stream", "window"])
def test_every_split_of_real_text(tokenizer, window):
    # A prompt may end in the middle of a character: the output then starts with the rest of
    # its bytes, which decode as they would on their own.
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    for cut in range(1, len(ids)):
        detok = stream(tokenizer, ids[:cut], ids[cut:], window, cut)
        assert detok.text == tokenizer.decode(ids[cut:]), cut
    assert stream(tokenizer, [], ids, window).text == TEXT


@pytest.mark.parametrize("window", [False, True], ids=["stream", "window"])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tokenizer, window, include):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    detok = stream(tokenizer, [], ids, window, stop=["Test 🌍"],
                   include_stop_str_in_output=include)
    assert detok.stop_reason == "Test 🌍"
    assert detok.text == "Grüße, 世界! Ein " + ("Test 🌍" if include else "")


def test_held_back_text_is_released_at_the_end(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["plain ascii!"])
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    sent = ""
    for token_id in ids:
        detok.add_tokens([token_id])
        sent += detok.take_delta(finished=False)
        assert len(detok.text) - len(sent) <= len("plain ascii!") - 1
    detok.flush()
    assert sent + detok.take_delta(finished=True) == TEXT
