"""A seeded ZMQ fuzzer against a running engine: hundreds of malformed messages on its client
socket (random frames, unknown and wrong types, garbage msgpack, valid type bytes with random
or mutated bodies, huge and deep structures) and on its worker socket (strangers, some calling
themselves "rank0"); afterwards the engine still serves requests exactly as before."""

from __future__ import annotations

import random
import time

import msgspec
import pytest
import zmq
from zmq_utils import Raw, greedy_request, start_engine, tokens, worker_config, workers

from zomni.proto import (
    PROTOCOL_VERSION,
    SCHEMA_HASH,
    Abort,
    Empty,
    FinishReason,
    Hello,
    ImageRequest,
    MsgType,
    WorkerError,
    encode,
)
from zomni.proto.messages import ModelRunnerOutput, Shutdown

SEED = 1234
NUM_CLIENT_MESSAGES = 400
NUM_WORKER_MESSAGES = 150
_TYPES = [int(t) for t in MsgType]


def random_value(rng: random.Random, depth: int = 0):
    """Any msgpack value, biased to what breaks decoders: edge integers, NaN, deep lists."""
    pick = rng.randrange(12 if depth < 4 else 8)
    return [
        lambda: rng.choice([0, -1, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1]),
        lambda: rng.randrange(-1000, 1000),
        lambda: rng.choice([float("nan"), float("inf"), -float("inf"), 1e39, -0.0, 1e-320]),
        lambda: rng.random() * 10 ** rng.randrange(-5, 40),
        lambda: "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(12))),
        lambda: rng.randbytes(rng.randrange(16)),
        lambda: rng.choice([None, True, False]),
        lambda: "r" + str(rng.randrange(50)),
        lambda: [random_value(rng, depth + 1) for _ in range(rng.randrange(6))],
        lambda: {str(random_value(rng, 3)): random_value(rng, depth + 1)
                 for _ in range(rng.randrange(4))},
        lambda: [random_value(rng, depth + 1) for _ in range(rng.randrange(20))],
        lambda: [5, 6, 7, random_value(rng, depth + 1)],
    ][pick]()


def mutate(rng: random.Random, value):
    """`value` (a decoded msgpack tree) with one random node replaced, dropped or added."""
    if isinstance(value, list) and value and rng.random() < 0.7:
        value = list(value)
        i = rng.randrange(len(value))
        roll = rng.random()
        if roll < 0.6:
            value[i] = mutate(rng, value[i])
        elif roll < 0.8:
            del value[i]
        else:
            value.append(random_value(rng))
        return value
    return random_value(rng)


def valid_bodies() -> list[tuple[MsgType, bytes]]:
    """Well-formed bodies to mutate: requests (with every sampling field), abort, hello."""
    request = greedy_request("fz", max_tokens=4, min_tokens=1, top_p=0.9, top_k=5, seed=1,
                             stop_token_ids=[3], logprobs=2, repetition_penalty=1.1)
    request.sampling.temperature = 0.5
    full = msgspec.msgpack.Encoder()
    return [(MsgType.REQUEST, full.encode(request)),
            (MsgType.REQUEST, full.encode(ImageRequest("fz-img", prompt="a cat"))),
            (MsgType.ABORT, full.encode(Abort(["fz", "r1"]))),
            (MsgType.HELLO, full.encode(Hello(PROTOCOL_VERSION, SCHEMA_HASH, "fz"))),
            (MsgType.PING, full.encode(Empty()))]


def client_message(rng: random.Random, bodies) -> list[bytes]:
    roll = rng.randrange(10)
    type_byte = bytes([rng.choice(_TYPES)])
    if roll == 0:  # any number of random frames
        return [rng.randbytes(rng.randrange(8)) for _ in range(rng.randrange(1, 5))]
    if roll == 1:  # a type byte that is no type, or a frame 0 of the wrong size
        return [rng.choice([b"\x00", b"\xff", b"\x03\x03", b""]), rng.randbytes(8)]
    if roll == 2:  # a real type with random bytes
        return [type_byte, rng.randbytes(rng.randrange(64))]
    if roll == 3:  # a real type with a random msgpack value
        return [type_byte, msgspec.msgpack.encode(random_value(rng))]
    if roll == 4:  # a valid body under another type
        return [type_byte, rng.choice(bodies)[1]]
    if roll == 5:  # huge or deep
        huge = rng.choice([b"\x91" * 200_000 + b"\x00",
                           msgspec.msgpack.encode([0, "big", list(range(1_000_000)), []]),
                           msgspec.msgpack.encode([0, "s" * 4_000_000, [5], []]),
                           msgspec.msgpack.encode({str(i): i for i in range(100_000)})])
        return [bytes([rng.choice([MsgType.REQUEST, MsgType.PING, MsgType.ABORT])]), huge]
    if roll == 6:  # a valid message with extra frames
        msg_type, body = rng.choice(bodies)
        return [bytes([msg_type]), body, *(rng.randbytes(9) for _ in range(rng.randrange(3)))]
    msg_type, body = rng.choice(bodies)  # 7-9: a mutated valid body
    value = msgspec.msgpack.decode(body)
    for _ in range(rng.randrange(1, 4)):
        value = mutate(rng, value)
    return [bytes([msg_type]), msgspec.msgpack.encode(value)]


def worker_message(rng: random.Random) -> list[bytes]:
    """What a stranger on the worker socket might send: from a real rank it would be fatal."""
    roll = rng.randrange(5)
    if roll == 0:
        return encode(MsgType.WORKER_ERROR, WorkerError(rng.randrange(100), "Traceback: evil"))
    if roll == 1:
        return encode(MsgType.STEP_RESULT, ModelRunnerOutput(rng.randrange(100), ["x"], [1]))
    if roll == 2:
        return encode(MsgType.SHUTDOWN, Shutdown("evil"))
    if roll == 3:
        return [bytes([rng.choice(_TYPES)]), rng.randbytes(rng.randrange(32))]
    return [rng.randbytes(rng.randrange(4)) for _ in range(rng.randrange(1, 4))]


def _run(raw: Raw, request) -> list:
    raw.send(MsgType.REQUEST, request)
    return raw.outputs(request.request_id)


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_engine_survives_a_zmq_fuzzer(llama_dir, ctx):
    engine = start_engine(llama_dir)
    rng = random.Random(SEED)
    try:
        good = Raw(ctx, engine.address)
        good.hello()
        short = tokens(_run(good, greedy_request("short")))
        long = tokens(_run(good, greedy_request("long", max_tokens=600, ignore_eos=True)))
        started = time.monotonic()

        # 1. the worker socket, while a step runs (only then does the engine read it)
        address = worker_config(workers(engine)[0]).engine_address
        strangers = [Raw(ctx, address, identity) for identity in
                     (b"rank0", b"rank1", b"evil", b"rank0-" + b"0" * 32)]
        good.send(MsgType.REQUEST, greedy_request("long2", max_tokens=600, ignore_eos=True))
        for _ in range(NUM_WORKER_MESSAGES):
            rng.choice(strangers).send_frames(worker_message(rng))
        assert tokens(good.outputs("long2")) == long

        # 2. the client socket: two clients said HELLO, two did not
        fuzzers = [Raw(ctx, engine.address) for _ in range(4)]
        for raw in fuzzers[:2]:
            raw.hello()
        bodies = valid_bodies()
        for i in range(NUM_CLIENT_MESSAGES):
            fuzzers[i % 4].send_frames(client_message(rng, bodies))
            if i % 50 == 49:
                for raw in fuzzers:
                    raw.drain(0.0)
        oversized = Raw(ctx, engine.address)
        oversized.send_frames([bytes([MsgType.REQUEST]), b"\x00" * (65 * 2**20)])
        for raw in fuzzers[:2]:  # end whatever valid requests the mutations made
            raw.send(MsgType.ABORT, Abort([f"r{k}" for k in range(50)] + ["fz", "fz-img"]))
        _wait_idle(good)
        assert time.monotonic() - started < 30.0

        # 3. it still serves, exactly as before, any client, and its step loop still answers
        assert engine.alive()
        assert tokens(_run(good, greedy_request("short-after"))) == short
        fresh = Raw(ctx, engine.address)
        fresh.hello()
        outs = _run(fresh, greedy_request("fresh"))
        assert tokens(outs) == short and outs[-1].finish_reason == FinishReason.LENGTH
        fresh.send(MsgType.PING, Empty())
        assert fresh.recv()[0] == MsgType.PONG
    finally:
        engine.shutdown()


def _wait_idle(raw: Raw, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw.send(MsgType.GET_STATS, Empty())
        got = raw.recv()
        while got is not None and got[0] != MsgType.STATS:
            got = raw.recv()
        assert got is not None, "the engine no longer answers"
        stats = got[1].scheduler
        if stats.num_running == 0 and stats.num_waiting == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the engine did not go idle")
