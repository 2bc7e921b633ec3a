"""Helpers of the ZMQ-level tests: a real engine process, raw DEALER clients, its workers."""

from __future__ import annotations

import time
import uuid

import psutil
import zmq

from zomni.frontend.launch import EngineProcess, make_config
from zomni.proto import (
    PROTOCOL_VERSION,
    SCHEMA_HASH,
    EngineRequest,
    Hello,
    MsgType,
    SamplingParams,
    WorkerConfig,
    decode,
    encode,
)
from zomni.proto.config import from_json

TIMEOUT_S = 30.0


def start_engine(model_dir, **overrides) -> EngineProcess:
    """An engine process with a small KV cache and one torch thread per worker."""
    overrides.setdefault("num_kv_blocks", 64)
    return EngineProcess(make_config(str(model_dir), num_threads=1, **overrides))


class Raw:
    """A raw DEALER client: sends any frames, reads whatever comes back."""

    def __init__(self, ctx: zmq.Context, address: str, identity: bytes | None = None,
                 **sockopts):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity or f"raw-{uuid.uuid4().hex}".encode())
        for name, value in sockopts.items():
            setattr(self.sock, name, value)
        self.sock.connect(address)

    def send(self, msg_type: MsgType, msg) -> None:
        self.sock.send_multipart(encode(msg_type, msg))

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = TIMEOUT_S):
        """(type, message) of the next message, or None after `timeout` seconds."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        msg_type, msg, _ = decode(self.sock.recv_multipart())
        return msg_type, msg

    def drain(self, quiet: float = 0.05) -> list:
        """Every message that arrives until `quiet` seconds pass without one."""
        got = []
        while (item := self.recv(quiet)) is not None:
            got.append(item)
        return got

    def hello(self) -> None:
        self.send(MsgType.HELLO, Hello(PROTOCOL_VERSION, SCHEMA_HASH, "test"))
        got = self.recv()
        assert got is not None and got[0] == MsgType.READY, got

    def outputs(self, request_id: str, timeout: float = TIMEOUT_S) -> list:
        """Every output of `request_id` until its final one (other messages are dropped)."""
        return self.collect([request_id], timeout)[request_id]

    def collect(self, request_ids: list[str], timeout: float = TIMEOUT_S) -> dict[str, list]:
        """Each request's outputs up to its first final one; other messages are dropped."""
        outs: dict[str, list] = {r: [] for r in request_ids}
        deadline = time.monotonic() + timeout
        done: set[str] = set()
        while done != set(outs) and (got := self.recv(max(0.0, deadline - time.monotonic()))):
            if got[0] != MsgType.OUTPUTS:
                continue
            for out in got[1].outputs:
                if out.request_id in outs and out.request_id not in done:
                    outs[out.request_id].append(out)
                    if out.finish_reason is not None:
                        done.add(out.request_id)
        assert done == set(outs), f"no final output in {timeout} s for {set(outs) - done}"
        return outs

    def close(self) -> None:
        self.sock.close(linger=0)


def greedy_request(request_id: str, max_tokens: int = 8, prompt=(5, 6, 7),
                   **sampling) -> EngineRequest:
    sampling.setdefault("temperature", 0.0)
    return EngineRequest(request_id, list(prompt), SamplingParams(max_tokens=max_tokens,
                                                                  **sampling))


def tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def with_sampling(request: EngineRequest, **fields) -> EngineRequest:
    """`request` with sampling fields set past validation, as a custom client could send."""
    for name, value in fields.items():
        setattr(request.sampling, name, value)
    return request


def workers(engine: EngineProcess) -> list[psutil.Process]:
    """The engine's worker processes, in rank order."""
    procs = [p for p in psutil.Process(engine.proc.pid).children()
             if "zomni.workers.worker" in " ".join(p.cmdline())]
    return sorted(procs, key=lambda p: worker_config(p).rank)


def worker_config(proc: psutil.Process) -> WorkerConfig:
    return from_json(proc.cmdline()[-1], WorkerConfig)


def wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    """The pids still running (zombies count as gone) after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.1)
    return alive


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
