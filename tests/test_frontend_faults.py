"""The frontend's side of faults, over real `zomni` processes: a hung engine turns /health 503
and fails its HTTP requests clearly, SIGTERM drains the streams in flight, and a frontend
reaches a CURVE-secured engine with the keys `zomni keys generate` made (or says why not)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from http_utils import Proc, http, start_serve, zomni_cmd
from zmq_utils import wait_gone

from zomni._process import free_port
from zomni.proto import EngineDead
from zomni.proto.client import EngineClient
from zomni.testing import build_model


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    """A tiny llama with a 64k context: a request of 30k tokens outlives any test."""
    return build_model(tmp_path_factory.mktemp("long") / "llama", "llama", shape="tiny",
                       max_position_embeddings=65536)


@pytest.fixture
def tmpdir_env(monkeypatch):
    """A private TMPDIR for the processes a test starts: what they leave shows up here."""
    path = tempfile.mkdtemp(prefix="zt-")  # short: ipc paths must stay under 107 bytes
    monkeypatch.setenv("TMPDIR", path)
    yield Path(path)
    os.rmdir(path)  # fails if anything is left


class Stream(threading.Thread):
    """One streamed completion, read on a thread: `events` holds its decoded chunks and
    "[DONE]"; `first` is set at the first event (or when the stream ends without one)."""

    def __init__(self, base_url: str, **body):
        super().__init__(daemon=True)
        self.request = urllib.request.Request(
            base_url + "/v1/completions", method="POST",
            data=json.dumps({"prompt": "def f", "stream": True, **body}).encode(),
            headers={"Content-Type": "application/json"})
        self.events: list = []
        self.refused: tuple[int, bytes] | None = None  # (status, body) of a non-200 answer
        self.first = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            with urllib.request.urlopen(self.request, timeout=120) as resp:
                for line in resp:
                    if line.startswith(b"data: "):
                        data = line[len(b"data: "):].strip()
                        self.events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
                        self.first.set()
        except urllib.error.HTTPError as e:
            self.refused = (e.code, e.read())
        finally:
            self.first.set()


def _child(proc: Proc, module: str) -> psutil.Process:
    return next(p for p in psutil.Process(proc.proc.pid).children(recursive=True)
                if module in " ".join(p.cmdline()))


def _everyone(proc: Proc) -> list[int]:
    return [proc.proc.pid, *(c.pid for c in psutil.Process(proc.proc.pid).children(True))]


def _error(body: bytes) -> dict:
    return json.loads(body)["error"]


def _running(base_url: str, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while json.loads(http("GET", base_url + "/stats")[2])["num_running"] < n:
        assert time.monotonic() < deadline, f"{n} requests never ran"
        time.sleep(0.05)


def _resume_and_kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).resume()
            psutil.Process(pid).kill()


# ---- a hung engine (item 8) -----------------------------------------------------------------


def test_health_is_503_while_the_engine_does_not_answer(llama_dir, tmp_path):
    """A stopped engine core keeps its process and its connection: only a ping shows it."""
    serve = start_serve(llama_dir, tmp_path / "serve.log")
    engine = None
    try:
        serve.wait_healthy()
        engine = _child(serve, "zomni.core.engine")
        engine.suspend()  # SIGSTOP
        status, _, body = http("GET", serve.base_url + "/health")
        assert status == 503 and "did not answer a ping" in _error(body)["message"], body
        engine.resume()
        serve.wait_healthy(30)  # it answers again
        assert serve.stop(signal.SIGTERM) == 0, serve.output()
    finally:
        if engine is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                engine.resume()
        serve.kill()


def test_hung_worker_fails_http_requests_with_503(long_model, tmp_path):
    serve = start_serve(long_model, tmp_path / "serve.log", "--num-kv-blocks", "1024",
                        "--step-timeout-s", "2")
    pids: list[int] = []
    try:
        serve.wait_healthy()
        pids = _everyone(serve)
        stream = Stream(serve.base_url, max_tokens=30000, ignore_eos=True)
        assert stream.first.wait(60) and stream.events, (stream.refused, serve.output())
        plain: list = []
        waiter = threading.Thread(target=lambda: plain.append(http(
            "POST", serve.base_url + "/v1/completions",
            {"prompt": "def g", "max_tokens": 30000, "ignore_eos": True}, timeout=120)))
        waiter.start()
        _running(serve.base_url, 2)
        _child(serve, "zomni.workers.worker").suspend()
        stream.join(60)
        waiter.join(60)
        status = http("GET", serve.base_url + "/health")[0]  # within the 2 s death grace
        assert stream.events[-1] == "[DONE]", stream.events[-3:]
        error = stream.events[-2]["error"]
        assert error["type"] == "service_unavailable" and "step_timeout_s = 2" in \
            error["message"], error
        [(plain_status, _, body)] = plain
        assert plain_status == 503 and "step_timeout_s = 2" in _error(body)["message"], body
        assert status == 503
        assert serve.proc.wait(30) == 1  # its engine died: a supervisor restarts it
        assert wait_gone(pids) == []
    finally:
        _resume_and_kill(pids)
        serve.kill()


# ---- SIGTERM drains (item 9) ----------------------------------------------------------------


def test_sigterm_drains_streams_then_ends_the_rest(long_model, tmpdir_env, tmp_path):
    serve = start_serve(long_model, tmp_path / "serve.log", "--num-kv-blocks", "1024",
                        "--drain-timeout-s", "5")
    pids: list[int] = []
    try:
        serve.wait_healthy()
        pids = _everyone(serve)
        long = Stream(serve.base_url, max_tokens=30000, ignore_eos=True)
        short = Stream(serve.base_url, max_tokens=128, ignore_eos=True)
        assert long.first.wait(60) and short.first.wait(60), serve.output()
        serve.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while http("GET", serve.base_url + "/health")[0] != 503:  # the drain began
            assert time.monotonic() < deadline, serve.output()
            time.sleep(0.05)
        status, _, body = http("POST", serve.base_url + "/v1/completions",
                               {"prompt": "late", "max_tokens": 1})
        assert status == 503 and "shutting down" in _error(body)["message"], body
        assert serve.proc.wait(60) == 0, serve.output()
        long.join(10)
        short.join(10)
        assert short.events[-1] == "[DONE]" and \
            short.events[-2]["choices"][0]["finish_reason"] == "length"  # it could finish
        assert long.events[-1] == "[DONE]", long.events[-3:]
        error = long.events[-2]["error"]
        assert error["type"] == "service_unavailable" and "drain_timeout_s = 5" in \
            error["message"], error
        assert wait_gone(pids) == []
        deadline = time.monotonic() + 10
        while os.listdir(tmpdir_env) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert os.listdir(tmpdir_env) == []  # run dirs removed
    finally:
        _resume_and_kill(pids)
        serve.kill()


# ---- CURVE keys from the command line (item 11) ---------------------------------------------


def test_frontend_reaches_a_curve_engine_with_generated_keys(llama_dir, tmp_path):
    keys = tmp_path / "keys"
    for extra in ([], ["--client", "web"]):
        out = subprocess.run(zomni_cmd("keys", "generate", str(keys), *extra),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    assert (keys / "server.key_secret").is_file()
    assert (keys / "clients" / "web.key_secret").is_file()
    address = f"tcp://127.0.0.1:{free_port()}"
    engine = Proc(zomni_cmd("engine", "--model", str(llama_dir), "--listen", address,
                            "--curve-keys", str(keys), "--num-kv-blocks", "64",
                            "--num-threads", "1"), tmp_path / "engine.log")
    port = free_port()
    frontend = Proc(zomni_cmd("frontend", "--engine", address, "--curve-keys", str(keys),
                              "--port", str(port)), tmp_path / "frontend.log", port)
    stranger = Proc(zomni_cmd("frontend", "--engine", address, "--port", str(free_port())),
                    tmp_path / "stranger.log")
    try:
        frontend.wait_healthy()
        status, _, body = http("POST", frontend.base_url + "/v1/completions",
                               {"prompt": "hi", "max_tokens": 4, "ignore_eos": True})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 4, body
        # no keys: a clear error and exit code 1, not a wait for the ready timeout
        assert stranger.proc.wait(60) == 1
        assert "uses CURVE" in stranger.output() and "--curve-keys" in stranger.output()
        # the server key but a client key the engine does not list: refused, said so
        client = EngineClient(address, server_key=keys)
        with pytest.raises(EngineDead, match="refused this client's CURVE key"):
            client.connect(timeout=60)
        client.close()
        assert frontend.stop(signal.SIGTERM) == 0, frontend.output()
        assert engine.stop(signal.SIGTERM) == 0, engine.output()
    finally:
        for proc in (stranger, frontend, engine):
            proc.kill()
