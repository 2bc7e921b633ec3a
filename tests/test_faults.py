"""Faults over real processes: a hung worker is detected, SIGTERM drains, and no kill leaves a
process or a file behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import zmq
from http_utils import http, zomni_cmd
from zmq_utils import Raw, greedy_request, start_engine, tokens, wait_gone, worker_config, workers

from zomni._process import free_port
from zomni.proto import Empty, EngineDead, FinishReason, MsgType
from zomni.proto.client import AsyncEngineClient, EngineClient
from zomni.testing import build_model


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    """A tiny llama with a 64k context: a request of 60k tokens outlives any test's drain."""
    return build_model(tmp_path_factory.mktemp("long") / "llama", "llama", shape="tiny",
                       max_position_embeddings=65536)


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def tmpdir_env(monkeypatch):
    """A private TMPDIR for the processes a test starts, checked empty at the end: whatever
    they leave in "/tmp" shows up here."""
    path = tempfile.mkdtemp(prefix="zt-")  # short: ipc paths must stay under 107 bytes
    monkeypatch.setenv("TMPDIR", path)
    tempfile.tempdir = None  # this process's own engines go there too
    yield Path(path)
    tempfile.tempdir = None
    os.rmdir(path)  # fails if anything is left


def _everyone(pid: int) -> list[int]:
    proc = psutil.Process(pid)
    return [pid, *(c.pid for c in proc.children(recursive=True))]


def _wait_empty(path: Path, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := sorted(os.listdir(path))) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


# ---- a hung worker (item 8) -----------------------------------------------------------------


def test_stopped_worker_fails_requests_within_the_deadline(long_model, ctx):
    engine = start_engine(long_model, num_kv_blocks=1024, step_timeout_s=2.0)
    raw = Raw(ctx, engine.address)
    raw.hello()
    worker = workers(engine)[0]
    engine_dir = Path(worker_config(worker).engine_address[len("ipc://"):]).parent
    pids = _everyone(engine.proc.pid)
    try:
        raw.send(MsgType.REQUEST, greedy_request("long", max_tokens=60000, ignore_eos=True))
        assert raw.recv()[0] == MsgType.OUTPUTS  # it runs
        worker.suspend()  # SIGSTOP
        stopped_at = time.monotonic()
        out = raw.outputs("long", timeout=15.0)[-1]
        failed_after = time.monotonic() - stopped_at
        assert out.finish_reason == FinishReason.ERROR and out.error_kind == "EngineDead"
        assert "rank 0" in out.error and "step_timeout_s = 2" in out.error, out.error
        assert "rank 0 is stopped" in out.error, out.error
        assert 1.5 < failed_after < 8.0
        got = raw.recv(5.0)
        assert got is not None and got[0] == MsgType.ENGINE_DEAD and "rank 0" in got[1].reason
        assert engine.proc.wait(15) == 1
        assert wait_gone(pids) == []  # the stopped worker was killed
        assert not engine_dir.exists()
    finally:
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def test_pings_are_answered_while_a_step_runs_within_its_deadline(long_model, ctx):
    engine = start_engine(long_model, num_kv_blocks=1024, step_timeout_s=3.0)
    raw = Raw(ctx, engine.address)
    raw.hello()
    worker = workers(engine)[0]
    try:
        raw.send(MsgType.REQUEST, greedy_request("long", max_tokens=60000, ignore_eos=True))
        assert raw.recv()[0] == MsgType.OUTPUTS
        worker.suspend()
        stopped_at = time.monotonic()
        raw.drain(0.3)  # outputs of the steps that were done
        pongs = []
        while (elapsed := time.monotonic() - stopped_at) < 6.0:
            raw.send(MsgType.PING, Empty())
            got = raw.recv(0.5)
            if got is not None and got[0] == MsgType.PONG:
                pongs.append(elapsed)
            elif got is not None and got[0] in (MsgType.OUTPUTS, MsgType.ENGINE_DEAD):
                break  # the watchdog fired
        assert pongs and max(pongs) < 3.5  # PONGs while the step is young, none once overdue
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
        engine.shutdown()


# ---- SIGTERM drains (item 9) ----------------------------------------------------------------


def test_sigterm_drains_then_ends_the_rest_with_an_error(long_model, ctx):
    engine = start_engine(long_model, num_kv_blocks=1024, drain_timeout_s=4.0)
    raw = Raw(ctx, engine.address)
    raw.hello()
    pids = _everyone(engine.proc.pid)
    raw.send(MsgType.REQUEST, greedy_request("short", max_tokens=2000, ignore_eos=True))
    raw.send(MsgType.REQUEST, greedy_request("long", max_tokens=60000, ignore_eos=True))
    outs: dict[str, list] = {"short": [], "long": []}
    while not (outs["short"] and outs["long"]):  # both run
        msg_type, msg = raw.recv()
        for out in msg.outputs:
            outs[out.request_id].append(out)
    engine.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    refused_ping = refused_request = False
    while not (outs["long"][-1].finish_reason is not None):
        if not refused_ping:  # PING until it is refused: then the engine is draining
            raw.send(MsgType.PING, Empty())
        msg_type, msg = raw.recv(10.0)
        if msg_type == MsgType.ERROR and msg.reply_to == MsgType.PING:
            assert msg.kind == "EngineDead" and "shutting down" in msg.message
            refused_ping = True
            raw.send(MsgType.REQUEST, greedy_request("late"))
        elif msg_type == MsgType.OUTPUTS:
            for out in msg.outputs:
                if out.request_id == "late":
                    assert out.error_kind == "EngineDead" and "shutting down" in out.error
                    refused_request = True
                else:
                    outs[out.request_id].append(out)
    assert refused_ping and refused_request
    # the request that could finish did; the other ended with an error when the drain did
    assert outs["short"][-1].finish_reason == FinishReason.LENGTH
    assert len(tokens(outs["short"])) == 2000
    last = outs["long"][-1]
    assert last.finish_reason == FinishReason.ERROR and last.error_kind == "EngineDead"
    assert "drain_timeout_s = 4" in last.error
    assert 3.5 < time.monotonic() - signalled < 12.0
    assert raw.recv(5.0)[0] == MsgType.ENGINE_DEAD
    assert engine.proc.wait(15) == 0
    assert wait_gone(pids) == []


def test_async_client_sees_the_drain(long_model):
    """What a frontend sees: PING fails at once (its /health turns 503), the stream in flight
    ends with EngineDead when the drain does."""
    engine = start_engine(long_model, num_kv_blocks=1024, drain_timeout_s=1.0)

    async def run():
        client = AsyncEngineClient(engine.address, alive=engine.alive)
        await client.connect()
        assert await client.ping()
        stream = client.generate(greedy_request("long", max_tokens=60000, ignore_eos=True))
        await stream.__anext__()
        engine.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert not await client.ping(timeout=2.0)
        with pytest.raises(EngineDead, match="drain_timeout_s"):
            async for _ in stream:
                pass
        client.close()

    try:
        asyncio.run(run())
        assert engine.proc.wait(15) == 0
    finally:
        engine.shutdown()


def test_a_closed_client_does_not_hold_up_the_drain(long_model):
    engine = start_engine(long_model, num_kv_blocks=1024, drain_timeout_s=30.0)
    client = EngineClient(engine.address, alive=engine.alive)
    client.connect()
    client.add_request(greedy_request("long", max_tokens=60000, ignore_eos=True))
    assert client.recv(30_000) is not None
    client.close()  # aborts what it leaves open
    start = time.monotonic()
    engine.shutdown()
    assert time.monotonic() - start < 10.0 and engine.proc.returncode == 0


# ---- nothing is left behind (item 10) -------------------------------------------------------


_LLM_SCRIPT = """
import os, sys, psutil
from zomni import LLM
llm = LLM(model={model!r}, num_kv_blocks=64, num_threads=1)
pids = [c.pid for c in psutil.Process().children(recursive=True)]
print(" ".join(map(str, pids)), flush=True)
sys.stdin.read()
"""


def _start_llm_script(model: Path) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(
        _LLM_SCRIPT.format(model=str(model)))], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) >= 2, "no engine and worker"
    return proc, pids


def test_llm_program_killed_leaves_nothing(llama_dir, tmpdir_env):
    proc, pids = _start_llm_script(llama_dir)
    assert len(os.listdir(tmpdir_env)) == 1  # the tree's private directory
    proc.kill()
    proc.wait()
    assert wait_gone(pids) == []
    assert _wait_empty(tmpdir_env) == []


def test_engine_killed_under_llm_leaves_nothing(llama_dir, tmpdir_env):
    proc, pids = _start_llm_script(llama_dir)
    (tree,) = os.listdir(tmpdir_env)
    os.kill(pids[0], signal.SIGKILL)  # the engine core (the first child)
    assert wait_gone(pids) == []
    # its workers removed its files at once; the program owns the (now empty) directory
    assert _wait_empty(tmpdir_env / tree) == [".zomni-owner"]
    proc.stdin.close()
    assert proc.wait(30) == 0
    assert _wait_empty(tmpdir_env) == []


def test_engine_killed_under_serve_leaves_nothing(llama_dir, tmpdir_env, tmp_path):
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        serve = subprocess.Popen(zomni_cmd("serve", "--model", str(llama_dir), "--port",
                                           str(port), "--num-kv-blocks", "64",
                                           "--num-threads", "1"),
                                 stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while http("GET", f"http://127.0.0.1:{port}/health")[0] != 200:
            assert serve.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.2)
        pids = _everyone(serve.pid)
        engine = next(p for p in pids if "zomni.core.engine" in
                      " ".join(psutil.Process(p).cmdline()))
        os.kill(engine, signal.SIGKILL)
        serve.wait(30)  # the frontend sees its engine die and exits
        assert wait_gone(pids) == []
        assert _wait_empty(tmpdir_env) == []
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def _cmdline(pid: int) -> str:
    with contextlib.suppress(psutil.Error):
        return f"{pid}: {' '.join(psutil.Process(pid).cmdline())[:200]}"
    return f"{pid}: gone"


@pytest.mark.parametrize("victim", ["command", "engine"])
def test_zomni_engine_killed_leaves_nothing(llama_dir, tmpdir_env, tmp_path, victim):
    address = f"tcp://127.0.0.1:{free_port()}"
    with open(tmp_path / "engine.log", "wb") as log:
        command = subprocess.Popen(zomni_cmd("engine", "--model", str(llama_dir), "--listen",
                                             address, "--num-kv-blocks", "64",
                                             "--num-threads", "1"),
                                   stdout=log, stderr=subprocess.STDOUT)
    ctx = zmq.Context()
    try:
        raw = Raw(ctx, address)
        raw.hello()  # ready
        pids = _everyone(command.pid)
        assert len(pids) >= 3 and len(os.listdir(tmpdir_env)) == 1
        engine = next(p for p in pids if "zomni.core.engine" in
                      " ".join(psutil.Process(p).cmdline()))
        os.kill(command.pid if victim == "command" else engine, signal.SIGKILL)
        left = wait_gone(pids)
        assert left == [], [_cmdline(p) for p in left]
        assert _wait_empty(tmpdir_env) == []
    finally:
        ctx.destroy(linger=0)
        if command.poll() is None:
            command.kill()
        command.wait()
