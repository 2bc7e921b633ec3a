"""The engine's doors over real ZMQ: HELLO first, a client's requests are its own, every float
is checked, CURVE keeps out whoever lacks the server key, and the worker socket takes nothing
from strangers."""

from __future__ import annotations

import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import zmq
from zmq_utils import (
    Raw,
    greedy_request,
    start_engine,
    tokens,
    with_sampling,
    worker_config,
    workers,
)

from zomni._process import free_port
from zomni.proto import (
    Abort,
    Empty,
    EngineConfig,
    EngineDead,
    FinishReason,
    InvalidRequest,
    MsgType,
    SamplingParams,
    WorkerError,
    decode,
    encode,
)
from zomni.proto.client import EngineClient
from zomni.proto.keys import apply_client, apply_server, generate
from zomni.proto.messages import ModelRunnerOutput, WorkerReady

ROOT = Path(__file__).resolve().parents[1]
FLOAT_FIELDS = ["temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                "presence_penalty"]
# finite in float64 but inf in float32 (the sampler's dtype), and the non-finite ones
NON_FINITE = [1e39, -1e39, math.inf, -math.inf, math.nan]


@pytest.fixture(scope="module")
def engine(llama_dir):
    e = start_engine(llama_dir)
    client = EngineClient(e.address, alive=e.alive)
    client.connect()  # ready
    client.close()
    yield e
    e.shutdown()


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def reference(engine) -> list[int]:
    """Greedy tokens of `greedy_request` from a well-behaved client."""
    client = EngineClient(engine.address, alive=engine.alive)
    client.connect()
    client.add_request(greedy_request("ref"))
    outs = []
    while not outs or outs[-1].finish_reason is None:
        got = client.recv(30_000)
        assert got is not None
        outs += [o for o in got[1].outputs if o.request_id == "ref"]
    client.close()
    return tokens(outs)


# ---- HELLO first (item 11) ------------------------------------------------------------------


def test_nothing_is_served_before_hello(engine, ctx, reference):
    raw = Raw(ctx, engine.address)
    raw.send(MsgType.REQUEST, greedy_request("r1"))
    (out,) = raw.outputs("r1")
    assert out.finish_reason == FinishReason.ERROR and out.error_kind == "ProtocolMismatch"
    assert "HELLO" in out.error and out.new_token_ids == []
    for msg_type, body in [(MsgType.PING, Empty()), (MsgType.GET_STATS, Empty()),
                           (MsgType.ABORT, Abort(["r1"]))]:
        raw.send(msg_type, body)
        got = raw.recv()
        assert got[0] == MsgType.ERROR and got[1].reply_to == msg_type, got
        assert "HELLO" in got[1].message
    assert raw.drain() == []  # r1 was never queued: no token of it comes later
    raw.hello()
    raw.send(MsgType.PING, Empty())
    assert raw.recv()[0] == MsgType.PONG
    raw.send(MsgType.REQUEST, greedy_request("r1"))
    assert tokens(raw.outputs("r1")) == reference


# ---- a client's requests are its own (item 11) ----------------------------------------------


def test_abort_of_another_clients_request_has_no_effect(engine, ctx):
    owner, other = Raw(ctx, engine.address), Raw(ctx, engine.address)
    owner.hello()
    other.hello()
    owner.send(MsgType.REQUEST, greedy_request("mine", max_tokens=300, ignore_eos=True))
    first = owner.recv()
    assert first[0] == MsgType.OUTPUTS and first[1].outputs[0].request_id == "mine"
    other.send(MsgType.ABORT, Abort(["mine"]))
    outs = [*first[1].outputs, *owner.outputs("mine")]
    assert outs[-1].finish_reason == FinishReason.LENGTH and len(tokens(outs)) == 300
    assert other.drain() == []  # and the other client heard nothing of it


def test_request_ids_may_collide_across_clients(engine, ctx, reference):
    a, b = Raw(ctx, engine.address), Raw(ctx, engine.address)
    a.hello()
    b.hello()
    a.send(MsgType.REQUEST, greedy_request("same", max_tokens=200, ignore_eos=True,
                                           prompt=(9, 10, 11)))
    b.send(MsgType.REQUEST, greedy_request("same"))  # same id, other prompt: no refusal
    b_outs = b.outputs("same")
    assert b_outs[-1].finish_reason == FinishReason.LENGTH and tokens(b_outs) == reference
    a_outs = a.outputs("same")
    assert a_outs[-1].finish_reason == FinishReason.LENGTH and len(tokens(a_outs)) == 200
    assert b.drain() == []  # none of a's 200 tokens reached b


def test_duplicate_id_within_one_client_is_refused(engine, ctx):
    raw = Raw(ctx, engine.address)
    raw.hello()
    raw.send(MsgType.REQUEST, greedy_request("dup", max_tokens=200, ignore_eos=True))
    raw.send(MsgType.REQUEST, greedy_request("dup"))
    outs = raw.outputs("dup")  # the refusal is the first final output
    assert outs[-1].finish_reason == FinishReason.ERROR and "already in use" in outs[-1].error
    rest = raw.outputs("dup")
    assert rest[-1].finish_reason == FinishReason.LENGTH
    assert len(tokens(outs + rest)) == 200


# ---- every float is finite and in range (item 2) -------------------------------------------


@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_sampling_params_refuse_non_finite_floats(field):
    for value in NON_FINITE:
        with pytest.raises(InvalidRequest) as e:
            SamplingParams(**{field: value})
        assert e.value.param == field
        bad = SamplingParams()
        setattr(bad, field, value)
        with pytest.raises(msgspec.ValidationError, match=field):  # what the engine decodes
            msgspec.msgpack.decode(msgspec.msgpack.encode(bad), type=SamplingParams)


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.5), ("temperature", 101.0), ("top_p", 0.0), ("top_p", 1.5),
    ("min_p", -0.1), ("min_p", 1.1), ("repetition_penalty", 0.0), ("repetition_penalty", 1e-9),
    ("repetition_penalty", 1e6), ("frequency_penalty", 2.5), ("presence_penalty", -3.0)])
def test_sampling_params_refuse_floats_out_of_range(field, value):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_sampling_params_refuse_integers_past_64_bits():
    for field in ("n", "max_tokens", "min_tokens", "top_k", "seed"):
        with pytest.raises(InvalidRequest) as e:
            SamplingParams(**{field: 2**64})
        assert e.value.param == field
    with pytest.raises(InvalidRequest, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[2**64])
    SamplingParams(temperature=100.0, repetition_penalty=0.01, top_p=1e-6, seed=2**63 - 1)


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", 1e39), ("temperature", math.inf), ("temperature", math.nan),
    ("top_p", math.nan), ("min_p", math.inf), ("repetition_penalty", -math.inf),
    ("frequency_penalty", math.nan), ("presence_penalty", 1e39)])
def test_bad_floats_over_zmq_get_an_error_output(engine, ctx, field, value):
    raw = Raw(ctx, engine.address)
    raw.hello()
    raw.send(MsgType.REQUEST, with_sampling(
        greedy_request("bad", max_tokens=4, min_tokens=4), **{field: value}))
    (out,) = raw.outputs("bad")
    assert out.finish_reason == FinishReason.ERROR and out.error_kind == "InvalidRequest"
    assert field in out.error and out.new_token_ids == []


def test_min_tokens_never_lets_eos_through_at_the_hottest_temperature(engine, ctx):
    eos = 2  # <|im_end|> in zomni.testing's tokenizer
    raw = Raw(ctx, engine.address)
    raw.hello()
    for seed in range(8):
        raw.send(MsgType.REQUEST, greedy_request(f"hot{seed}", max_tokens=32, min_tokens=32,
                                                 temperature=100.0, seed=seed))
    for outs in raw.collect([f"hot{seed}" for seed in range(8)]).values():
        assert len(tokens(outs)) == 32 and eos not in tokens(outs)


# ---- the worker socket (item 12) ------------------------------------------------------------


def test_worker_socket_ignores_strangers(engine, ctx, reference):
    address = worker_config(workers(engine)[0]).engine_address
    engine_dir = os.path.dirname(address[len("ipc://"):])
    for folder in (engine_dir, os.path.dirname(engine_dir)):  # private: only we can connect
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    garbage = [
        [b"\xff", b"\x00"], [b""], [bytes([MsgType.STEP_RESULT]), b"\xc1"],
        encode(MsgType.WORKER_ERROR, WorkerError(1, "Traceback: evil")),
        encode(MsgType.STEP_RESULT, ModelRunnerOutput(999, ["x"], [1])),
        encode(MsgType.WORKER_READY, WorkerReady(0, 1, "float32", "cpu", workers_info(engine))),
    ]
    strangers = [Raw(ctx, address, identity) for identity in (b"evil", b"rank0", b"rank1")]
    for stranger in strangers:
        for frames in garbage:
            stranger.send_frames(frames)
    client = Raw(ctx, engine.address)
    client.hello()
    client.send(MsgType.REQUEST, greedy_request("after"))
    assert tokens(client.outputs("after")) == reference
    assert engine.alive()


def workers_info(engine):
    client = EngineClient(engine.address, alive=engine.alive)
    try:
        return client.connect().runner
    finally:
        client.close()


# ---- CURVE (item 11) ------------------------------------------------------------------------


def test_keys_command_writes_private_keys_and_refuses_to_overwrite(tmp_path):
    keys = tmp_path / "keys"
    run = [sys.executable, "-m", "zomni.proto.keys", "generate", str(keys)]
    out = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(keys / "server.key_secret").st_mode) == 0o600
    assert (keys / "server.key").is_file()
    again = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert subprocess.run([*run, "--client", "web"], timeout=60).returncode == 0
    assert (keys / "clients" / "web.key").is_file()
    with pytest.raises(InvalidRequest, match="zomni keys generate"):
        EngineConfig(model="unused", curve_keys_dir=str(tmp_path / "none"))


def test_curve_admits_only_clients_with_the_server_key(llama_dir, tmp_path, ctx, reference):
    generate(tmp_path / "keys")
    generate(tmp_path / "other")
    address = f"tcp://127.0.0.1:{free_port()}"
    engine = start_engine(llama_dir, listen=address, curve_keys_dir=str(tmp_path / "keys"))
    try:
        client = EngineClient(address, alive=engine.alive, server_key=tmp_path / "keys")
        client.connect()
        client.add_request(greedy_request("ok"))
        outs = []
        while not outs or outs[-1].finish_reason is None:
            outs += client.recv(30_000)[1].outputs
        assert tokens(outs) == reference
        client.close()
        wrong = EngineClient(address, alive=engine.alive, server_key=tmp_path / "other")
        with pytest.raises(EngineDead, match="CURVE handshake"):  # said at once, no wait
            wrong.connect(timeout=30.0)
        wrong.close()
        plain = Raw(ctx, address)
        plain.send_frames([b"\x01", b"\x90"])
        assert plain.recv(2.0) is None
        example = subprocess.run(  # the example custom frontend, given the key
            [sys.executable, str(ROOT / "examples" / "custom_frontend.py"), "--engine",
             address, "--server-key", str(tmp_path / "keys" / "server.key"), "--max-tokens",
             "8"], capture_output=True, text=True, timeout=60)
        assert example.returncode == 0, example.stderr
        assert [int(t) for line in example.stdout.splitlines() if line.startswith("tokens:")
                for t in line.split()[1:]] == reference
    finally:
        engine.shutdown()


def test_curve_with_a_clients_folder_admits_only_listed_clients(tmp_path, ctx):
    keys = tmp_path / "keys"
    generate(keys)
    generate(keys, client="web")
    server = ctx.socket(zmq.ROUTER)
    authenticator = apply_server(server, str(keys))
    try:
        port = server.bind_to_random_port("tcp://127.0.0.1")
        for client_key, admitted in [(keys / "clients" / "web.key_secret", True), (None, False)]:
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            apply_client(sock, keys, client_key)
            sock.connect(f"tcp://127.0.0.1:{port}")
            sock.send_multipart([b"\x06", b"\x90"])
            assert bool(server.poll(1500)) == admitted
            if admitted:
                assert decode(server.recv_multipart()[1:])[0] == MsgType.PING
            sock.close()
    finally:
        authenticator.stop()
        server.close(linger=0)
