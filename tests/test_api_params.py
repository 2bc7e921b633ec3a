"""The Python API's share of the request parameters: `RequestOutput.prompt_logprobs` (vLLM's
layout, from child 0 when n > 1) and the model's generation_config defaults for calls
without `SamplingParams`. One `LLM` on a tiny random llama whose generation_config asks for
greedy decoding (temperature 0), which the library default (1.0) is not.
"""

from __future__ import annotations

import json

import pytest

from zomni import LLM, SamplingParams
from zomni.frontend.outputs import Logprob
from zomni.testing import build_model

PROMPT = [5, 9, 17, 33, 41]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    model = build_model(tmp_path_factory.mktemp("greedy-llama") / "m", "llama", seed=3)
    config = json.loads((model / "generation_config.json").read_text())
    config.update(temperature=0.0, top_k=7, do_sample=False)
    (model / "generation_config.json").write_text(json.dumps(config))
    with LLM(model=str(model), num_kv_blocks=64) as llm:
        yield llm


def test_calls_without_params_use_generation_config(llm):
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.top_p) == (0.0, 7, 1.0)
    plain = llm.generate([PROMPT], use_tqdm=False)[0].outputs[0].token_ids
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0.0), use_tqdm=False)
    assert plain == greedy[0].outputs[0].token_ids
    assert len(plain) == 16  # the library default max_tokens still applies


def test_prompt_logprobs_in_request_output(llm):
    [out] = llm.generate([PROMPT], SamplingParams(n=2, max_tokens=2, temperature=1.0, seed=1,
                                                  prompt_logprobs=2), use_tqdm=False)
    entries = out.prompt_logprobs
    assert entries is not None and len(entries) == len(PROMPT) and entries[0] is None
    tok = llm.get_tokenizer()
    for token_id, entry in zip(PROMPT[1:], entries[1:]):
        assert next(iter(entry)) == token_id and 2 <= len(entry) <= 3
        assert all(isinstance(lp, Logprob) and lp.logprob <= 0 for lp in entry.values())
        assert entry[token_id].decoded_token == tok.decode([token_id])
        assert {1, 2} <= {lp.rank for lp in entry.values()}  # the top-2, then the prompt's
    [plain] = llm.generate([PROMPT], SamplingParams(max_tokens=2), use_tqdm=False)
    assert plain.prompt_logprobs is None
