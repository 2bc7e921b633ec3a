"""AsyncLLM: streaming, abort, and bad requests next to good ones."""

from __future__ import annotations

import asyncio

import pytest

from zomni import SamplingParams
from zomni.proto import ContextLengthExceeded


@pytest.fixture(scope="module")
def async_llm(llama_dir, start_async_llm):
    """One engine and one event loop (`loop`) for the module."""
    return start_async_llm(llama_dir, num_kv_blocks=512)


async def collect(llm, prompt, params, request_id=None):
    outs = [out async for out in llm.generate(prompt, params, request_id=request_id)]
    return outs


def test_streams_tokens_incrementally(async_llm, loop):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = loop.run_until_complete(collect(async_llm, {"prompt_token_ids": [5, 6, 7, 8]}, params))
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths) and lengths[-1] == 12 and len(outs) > 1
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"


def test_abort_frees_blocks(async_llm, loop):
    async def run():
        await async_llm.start()
        params = SamplingParams(max_tokens=3000, temperature=0, ignore_eos=True)
        gen = async_llm.generate({"prompt_token_ids": list(range(3, 200))}, params,
                                 request_id="to-abort")
        first = await gen.__anext__()
        assert not first.finished
        await async_llm.abort("to-abort")
        last = first
        async for out in gen:
            last = out
        assert last.outputs[0].finish_reason == "abort"
        stats = await async_llm.client.get_stats()
        return stats

    stats = loop.run_until_complete(run())
    assert stats.scheduler.num_running == 0 and stats.scheduler.num_waiting == 0
    assert stats.scheduler.kv_usage == 0.0


def test_bad_request_does_not_disturb_others(async_llm, loop):
    async def run():
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        good = [collect(async_llm, {"prompt_token_ids": [5 + i, 6, 7]}, params)
                for i in range(4)]
        bad = collect(async_llm, {"prompt_token_ids": [5] * 5000}, params)
        return await asyncio.gather(*good, bad, return_exceptions=True)

    *good, bad = loop.run_until_complete(run())
    assert isinstance(bad, ContextLengthExceeded)
    for outs in good:
        assert len(outs[-1].outputs[0].token_ids) == 16
