"""The choices of one HTTP request (`Sequence`s) and their engine streams, merged into one.

    engine stream of choice 0 ─► RequestState.update ─► (choice 0, SequenceDelta) ─┐
    engine stream of choice 1 ─► RequestState.update ─► (choice 1, SequenceDelta) ─┼─► merged
    ...                                                                            ┘

Each item carries the delta of one engine output, copied when it was folded in: a choice's
stream may fold its next outputs before the consumer gets to an item (the consumer writes to
the socket; a choice whose outputs were buffered runs ahead), so a consumer reads the delta,
never the choice's cumulative `CompletionOutput`, while the stream is open.

Closing the merged stream (client gone, handler cancelled, stop string hit) closes each engine
stream, and `AsyncEngineClient.generate` aborts an unfinished request in the engine then.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from zomni.proto import EngineRequest
from zomni.proto.client import AsyncEngineClient

from .metrics import SequenceTimer
from .outputs import RequestState, SequenceDelta


@dataclass(eq=False)
class Sequence:
    """One choice of an HTTP request: its engine request, text state and timing."""

    state: RequestState
    request: EngineRequest
    timer: SequenceTimer
    prompt_text: str  # what `echo` prepends ("" without echo)
    counts_prompt: bool  # the first sequence of its prompt: its prompt tokens go in usage
    prompt_index: int  # which prompt of the request it samples
    prompt_only: bool = False  # echo with max_tokens 0: its one generated token is dropped
    text_offset: int = 0  # completions' logprobs: where the next token's text starts
    started: bool = False  # the first chunk (role / echo) was sent

    @property
    def num_completion_tokens(self) -> int:
        return 0 if self.prompt_only else len(self.state.output.token_ids)


Item = tuple[Sequence, SequenceDelta]


def usage_counts(seqs: list[Sequence]) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of a request: each prompt counts once."""
    return (sum(s.state.num_prompt_tokens for s in seqs if s.counts_prompt),
            sum(s.num_completion_tokens for s in seqs))


async def run_sequence(client: AsyncEngineClient, seq: Sequence) -> AsyncIterator[Item]:
    """(seq, delta) for each engine output of one sequence."""
    async with aclosing(client.generate(seq.request)) as stream:
        async for out, _ in stream:
            delta = seq.state.update(out)
            seq.timer.on_output(len(delta.token_ids))
            yield seq, delta
            if delta.stop_hit:  # leaving the `aclosing` block aborts it in the engine
                return


async def merge_sequences(client: AsyncEngineClient, seqs: list[Sequence]
                          ) -> AsyncIterator[Item]:
    """(seq, delta) for every engine output of any of `seqs`, as they arrive; each
    sequence's items in order. One sequence (the common case) needs no task or queue."""
    if len(seqs) == 1:
        async with aclosing(run_sequence(client, seqs[0])) as outs:
            async for item in outs:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(seq: Sequence) -> None:
        try:
            async with aclosing(run_sequence(client, seq)) as outs:
                async for item in outs:
                    queue.put_nowait(item)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait(e)
            return
        queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(s)) for s in seqs]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
