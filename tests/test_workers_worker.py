"""The worker process over real ZMQ: READY, a step, SHUTDOWN; errors; SIGTERM."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest
import zmq
from reference import hf_greedy

from zomni._process import free_port, new_ipc_address
from zomni.proto import (
    CachedRequestData,
    EngineConfig,
    MsgType,
    NewRequestData,
    SamplingParams,
    SchedulerOutput,
    Shutdown,
    WorkerConfig,
    decode,
    encode,
)
from zomni.proto.config import to_json

TIMEOUT_MS = 60_000


class Engine:
    """The engine side of the worker channel: a ROUTER, and the worker processes it started."""

    def __init__(self, model_dir, tmp_path, world_size: int = 1):
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        address = new_ipc_address("test-worker")
        self.router.bind(address)
        engine = EngineConfig(model=str(model_dir), num_kv_blocks=32, num_threads=1,
                              tensor_parallel_size=world_size)
        dist_init = f"tcp://127.0.0.1:{free_port()}"
        self.log = tmp_path / "worker.log"
        self.procs = []
        with open(self.log, "wb") as log:
            for rank in range(world_size):
                config = WorkerConfig(engine=engine, rank=rank, engine_address=address,
                                      dist_init_method=dist_init)
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "zomni.workers.worker", to_json(config)],
                    stdout=log, stderr=subprocess.STDOUT))
        self.proc = self.procs[0]

    def recv(self, identity: bytes | None = b"rank0"):
        """The next message (from `identity`, unless None: from any rank)."""
        assert self.router.poll(TIMEOUT_MS), f"no message from the workers:\n{self.log_text()}"
        got, *frames = self.router.recv_multipart()
        assert identity is None or got == identity
        msg_type, msg, _ = decode(frames)
        return msg_type, msg

    def send(self, msg_type: MsgType, msg) -> None:
        for rank in range(len(self.procs)):
            self.router.send_multipart([f"rank{rank}".encode(), *encode(msg_type, msg)])

    def wait(self) -> int:
        return max(p.wait(timeout=TIMEOUT_MS / 1000) for p in self.procs)

    def log_text(self) -> str:
        return self.log.read_text()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.router.close()
        self.ctx.term()


@pytest.fixture
def engine(model_dirs, tmp_path):
    e = Engine(model_dirs["qwen2"], tmp_path)
    yield e
    e.close()


def test_ready_step_shutdown(engine, model_dirs):
    msg_type, ready = engine.recv()
    assert msg_type == MsgType.WORKER_READY
    assert (ready.rank, ready.runner.num_kv_blocks, ready.dtype) == (0, 32, "float32")
    assert ready.weight_bytes > 0

    prompt = [5, 17, 42, 99, 7]
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    engine.send(MsgType.STEP, SchedulerOutput(
        7, [NewRequestData("a", prompt, greedy, [3], 0, len(prompt))], [], {"a": 5}, []))
    msg_type, out = engine.recv()
    assert msg_type == MsgType.STEP_RESULT
    assert (out.step_id, out.request_ids) == (7, ["a"])
    assert out.sampled_token_ids == hf_greedy(model_dirs["qwen2"], prompt, 1)[0]

    engine.send(MsgType.SHUTDOWN, Shutdown("test done"))
    assert engine.wait() == 0
    assert "rank 0: dtype float32" in engine.log_text()
    assert "num_kv_blocks=32" in engine.log_text()


def test_failed_step_reports_traceback_and_exits_nonzero(engine):
    assert engine.recv()[0] == MsgType.WORKER_READY
    engine.send(MsgType.STEP, SchedulerOutput(3, [], [], {"ghost": 1}, []))
    msg_type, out = engine.recv()
    assert msg_type == MsgType.WORKER_ERROR and out.step_id == 3
    assert "unknown request 'ghost'" in out.error and "Traceback" in out.error
    assert engine.wait() == 1


def test_sigterm_exits_cleanly(engine):
    assert engine.recv()[0] == MsgType.WORKER_READY
    engine.proc.send_signal(signal.SIGTERM)
    assert engine.wait() == 0
    assert "SIGTERM, exiting" in engine.log_text()


def test_failed_start_is_reported(model_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dirs["qwen2"], broken)
    (broken / "model.safetensors").unlink()
    e = Engine(broken, tmp_path)
    try:
        msg_type, out = e.recv()
        assert msg_type == MsgType.WORKER_ERROR and out.step_id == -1
        assert "no *.safetensors files" in out.error
        assert e.wait() == 1
    finally:
        e.close()


def test_tensor_parallel_2_ranks_match_transformers(model_dirs, tmp_path):
    """TP=2 over gloo: heads, MLP and vocabulary split over two processes; greedy tokens of a
    prefill then decode steps equal transformers' (rank 1 returns nothing)."""
    e = Engine(model_dirs["qwen3"], tmp_path, world_size=2)
    try:
        ready = [e.recv(None) for _ in range(2)]
        assert sorted(msg.rank for t, msg in ready if t == MsgType.WORKER_READY) == [0, 1]
        prompt, tokens, steps = [5, 17, 42, 99, 7, 300, 12], [], 12
        greedy = SamplingParams(temperature=0.0, max_tokens=steps)
        e.send(MsgType.STEP, SchedulerOutput(
            0, [NewRequestData("a", prompt, greedy, [0], 0, len(prompt))], [], {"a": 7}, []))
        for step in range(1, steps + 1):
            msg_type, out = e.recv(b"rank0")
            assert msg_type == MsgType.STEP_RESULT, out
            tokens += out.sampled_token_ids
            if step < steps:
                computed = len(prompt) + step - 1
                new_blocks = [1] if computed == 16 else []  # block size 16
                e.send(MsgType.STEP, SchedulerOutput(
                    step, [], [CachedRequestData("a", new_blocks, computed)], {"a": 1}, []))
        assert tokens == hf_greedy(model_dirs["qwen3"], prompt, steps)[0]
        e.send(MsgType.SHUTDOWN, Shutdown())
        assert e.wait() == 0
    finally:
        e.close()


def test_worker_env_keeps_user_settings(monkeypatch):
    from zomni.workers.device import worker_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    env = worker_env()
    assert env["GOMP_SPINCOUNT"] == "10000"
    tunables = env["GLIBC_TUNABLES"].split(":")
    assert tunables[0] == "glibc.malloc.arena_max=2" and "glibc.malloc.hugetlb=1" in tunables
    assert "glibc.malloc.mmap_threshold=33554432" in tunables

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    env = worker_env()
    assert "GOMP_SPINCOUNT" not in env
    assert env["GLIBC_TUNABLES"].split(":")[0] == "glibc.malloc.hugetlb=0"
    assert "glibc.malloc.hugetlb=1" not in env["GLIBC_TUNABLES"]
