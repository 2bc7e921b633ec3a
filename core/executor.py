"""Executor: starts the worker processes and ships each step plan to all of them.

    engine core ──ROUTER── rank0 (DEALER, identity b"rank0")  ──► returns ModelRunnerOutput
                       └── rank1 … rankN-1                     (execute, return nothing)

A plan is encoded once and the same frames are sent to every rank. Only rank 0 answers.
A worker that exits, or answers with an error, raises `EngineDead` naming the rank.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import time
from collections.abc import Callable

import zmq

from zomni._process import free_port, new_ipc_address
from zomni.proto import EngineConfig, EngineDead, ModelRunnerOutput, MsgType, decode, encode
from zomni.proto.config import WorkerConfig, to_json
from zomni.proto.messages import SchedulerOutput, Shutdown, WorkerReady

logger = logging.getLogger("zomni.engine")

_POLL_MS = 200  # how often a waiting executor checks that its workers are still alive


class Executor:
    def __init__(self, config: EngineConfig, ctx: zmq.Context, max_model_len: int,
                 startup_timeout: float = 600.0):
        self.config = config
        self.world_size = config.tensor_parallel_size
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.address = new_ipc_address("workers")
        self.socket.bind(self.address)
        dist_init = f"tcp://127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen] = []
        for rank in range(self.world_size):
            wcfg = WorkerConfig(engine=config, rank=rank, engine_address=self.address,
                                dist_init_method=dist_init, max_model_len=max_model_len)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "zomni.workers.worker", to_json(wcfg)]))
        ready = self._wait_ready(startup_timeout)
        self.num_kv_blocks = min(r.num_kv_blocks for r in ready)
        self.weight_bytes = [r.weight_bytes for r in sorted(ready, key=lambda r: r.rank)]
        self.dtype = ready[0].dtype

    def _wait_ready(self, timeout: float) -> list[WorkerReady]:
        ready: dict[int, WorkerReady] = {}
        deadline = time.monotonic() + timeout
        while len(ready) < self.world_size:
            self.check_alive()
            if time.monotonic() > deadline:
                raise EngineDead(f"workers not ready after {timeout:.0f} s "
                                 f"(ready ranks: {sorted(ready)})")
            if self.socket.poll(_POLL_MS):
                _identity, *frames = self.socket.recv_multipart()
                msg_type, msg = decode(frames)
                if msg_type == MsgType.WORKER_READY:
                    ready[msg.rank] = msg
                elif msg_type == MsgType.STEP_RESULT and msg.error:
                    raise EngineDead(f"worker failed to start: {msg.error}")
        return list(ready.values())

    def check_alive(self) -> None:
        for rank, proc in enumerate(self.procs):
            code = proc.poll()
            if code is not None:
                raise EngineDead(f"worker rank {rank} exited with code {code}")

    def execute(self, plan: SchedulerOutput) -> None:
        """Send the plan to every rank without waiting (the engine overlaps input handling)."""
        frames = encode(MsgType.STEP, plan)
        for rank in range(self.world_size):
            self.socket.send_multipart([f"rank{rank}".encode(), *frames], copy=False)

    def wait_result(self, on_idle: Callable[[], None]) -> ModelRunnerOutput:
        """Block until rank 0 answers; `on_idle` runs whenever the engine may do other work."""
        while True:
            on_idle()
            if not self.socket.poll(_POLL_MS):
                self.check_alive()
                continue
            _identity, *frames = self.socket.recv_multipart()
            msg_type, msg = decode(frames)
            if msg_type != MsgType.STEP_RESULT:
                continue
            if msg.error:
                raise EngineDead(f"worker rank 0 failed: {msg.error}")
            return msg

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask every worker to exit, then terminate (and finally kill) the stragglers."""
        frames = encode(MsgType.SHUTDOWN, Shutdown("engine shutting down"))
        for rank, proc in enumerate(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(zmq.ZMQError):
                    self.socket.send_multipart([f"rank{rank}".encode(), *frames],
                                               flags=zmq.NOBLOCK)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            for sig in (None, proc.terminate, proc.kill):
                if sig is not None:
                    sig()
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                    break
                except subprocess.TimeoutExpired:
                    deadline = time.monotonic() + 2.0
        self.socket.close(linger=0)
