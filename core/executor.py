"""Executor: starts the worker processes and ships each step plan to all of them.

    engine core ──ROUTER── rank0 (DEALER, identity b"rank0")  ──► returns ModelRunnerOutput
                       └── rank1 … rankN-1                     (execute, return nothing)

A plan is encoded once and the same frames are sent to every rank. Only rank 0 answers.

The executor never looks inside a plan or a result: it serves every model kind alike. Ranks
report what they resolved (defaults that follow the device) in WORKER_READY; they must agree.

Failure handling (the invariant: an Executor that raises has left no worker process behind):
- the tensor-parallel size was checked against the model (`read_model_info`) before;
- a worker that fails to start, exits, or sends WORKER_ERROR raises `EngineDead` naming the
  rank. When one rank dies, its peers usually fail a collective a moment later; the message
  names the rank that went first (killed, or exited without an error report) before the ranks
  that merely reported the broken collective.

- a worker that sends no result within `step_timeout_s` of when it could start a step is
  hung (SIGSTOPped, deadlocked, or far too slow): `wait_result` raises `EngineDead` naming
  rank 0 (the rank that answers), how long it was silent, and any rank the OS reports stopped.

Who may speak on the worker socket: the socket file lives in this engine's private directory
(mode 0700, `zomni._process`), and each rank's identity is `rank<r>-<token>` with a random
token the workers get in their environment (never on a command line, which other users can
read). Messages from any other identity are dropped unread, so a stray peer can neither crash
the engine nor connect as "rank0" before the real worker does.

Workers started here are *managed*: they ignore SIGTERM / SIGINT while the engine lives (a
Ctrl-C or a systemd stop reaches the whole process group; the engine drains and then stops
them), so stragglers at shutdown are SIGKILLed rather than terminated.

The torch.distributed rendezvous is a `file://` store in the engine's private directory: no
TCP port is chosen ahead of time, so two engines started at once cannot race for one (gloo and
nccl then pick their own ports, bound by the OS).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import zmq

from zomni._process import WORKER_TOKEN_ENV, runtime_dir, worker_identity
from zomni.proto import EngineConfig, EngineDead, InvalidRequest, MsgType, decode, encode
from zomni.proto.config import WorkerConfig, to_json
from zomni.proto.messages import (
    RunnerInfo,
    Shutdown,
    StepPlan,
    StepResult,
    WorkerReady,
)
from zomni.workers.device import worker_env

logger = logging.getLogger("zomni.engine")

_POLL_MS = 200  # how often a waiting executor checks that its workers are still alive
_GRACE_S = 1.0  # after a death: how long to wait for the other ranks' error reports
_MAX_LOGGED_PEERS = 16  # unknown peers on the worker socket that get a log line each


def _error_line(error: str) -> str:
    """The exception line of a worker's traceback: what a user needs in a one-line message."""
    lines = [line for line in error.strip().splitlines() if line.strip()]
    line = lines[-1].strip() if lines else "unknown error"
    return line if len(line) <= 300 else line[:300] + " ..."


class Executor:
    def __init__(self, config: EngineConfig, ctx: zmq.Context, max_model_len: int = 0,
                 startup_timeout: float = 600.0, on_idle: Callable[[], None] | None = None):
        self.config = config
        self.world_size = config.tensor_parallel_size
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.dir = tempfile.mkdtemp(prefix="e-", dir=runtime_dir())  # this engine's files
        self.address = f"ipc://{self.dir}/workers.sock"
        self.errors: dict[int, str] = {}  # rank -> error a worker reported
        token = secrets.token_hex(16)
        self._identities = [worker_identity(r, token) for r in range(self.world_size)]
        self._ranks = {identity: r for r, identity in enumerate(self._identities)}
        self._unknown_peers: set[bytes] = set()
        self.procs: list[subprocess.Popen] = []
        try:
            self.socket.bind(self.address)
            env = {**worker_env(), WORKER_TOKEN_ENV: token}
            for rank in range(self.world_size):
                wcfg = WorkerConfig(engine=config, rank=rank, engine_address=self.address,
                                    dist_init_method=f"file://{self.dir}/dist-store",
                                    max_model_len=max_model_len)
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "zomni.workers.worker", to_json(wcfg)], env=env))
            ready = self._wait_ready(startup_timeout, on_idle or (lambda: None))
        except BaseException:
            self.shutdown(graceful=False)
            raise
        ready.sort(key=lambda r: r.rank)
        if any(r.runner != ready[0].runner for r in ready):
            self.shutdown(graceful=False)
            raise EngineDead("worker ranks resolved different settings: "
                             + "; ".join(f"rank {r.rank}: {r.runner}" for r in ready))
        self.runner_info: RunnerInfo = ready[0].runner
        self.weight_bytes = [r.weight_bytes for r in ready]
        self.dtype = ready[0].dtype

    def _wait_ready(self, timeout: float, on_idle: Callable[[], None]) -> list[WorkerReady]:
        ready: dict[int, WorkerReady] = {}
        deadline = time.monotonic() + timeout
        while len(ready) < self.world_size:
            on_idle()
            self.check_alive(starting=True)
            if time.monotonic() > deadline:
                raise EngineDead(f"workers not ready after {timeout:.0f} s "
                                 f"(ready ranks: {sorted(ready)})")
            got = self._recv(_POLL_MS)
            if got is None:
                continue
            rank, msg_type, msg, _ = got
            if msg_type == MsgType.WORKER_READY:
                ready[msg.rank] = msg
            elif msg_type == MsgType.WORKER_ERROR:
                self._raise_dead(rank, starting=True)
        return list(ready.values())

    def _recv(self, timeout_ms: int) -> tuple[int, MsgType, object, list] | None:
        """(rank, type, message, extra frames) of the next worker message; error reports are
        recorded."""
        if not self.socket.poll(timeout_ms):
            return None
        identity, *frames = self.socket.recv_multipart(copy=False)
        rank = self._ranks.get(bytes(identity))
        if rank is None:  # not one of our workers: nothing it sends is read
            self._log_unknown_peer(bytes(identity))
            return None
        try:
            msg_type, msg, extra = decode(frames)
        except InvalidRequest as e:
            raise EngineDead(f"worker rank {rank} sent an undecodable message: {e}") from None
        if msg_type == MsgType.WORKER_ERROR:
            self.errors[rank] = msg.error
        return rank, msg_type, msg, extra

    def _log_unknown_peer(self, identity: bytes) -> None:
        """One warning per unknown peer (the first few), so a flood cannot fill the log."""
        if identity in self._unknown_peers or len(self._unknown_peers) >= _MAX_LOGGED_PEERS:
            return
        self._unknown_peers.add(identity)
        logger.warning("ignoring messages from unknown peer %r on the worker socket",
                       identity[:64])

    def check_alive(self, starting: bool = False) -> None:
        for rank, proc in enumerate(self.procs):
            if proc.poll() is not None:
                self._raise_dead(rank, starting)

    def _raise_dead(self, first_rank: int, starting: bool = False) -> None:
        """Raise `EngineDead` naming every failed rank, the likely cause first."""
        deadline = time.monotonic() + _GRACE_S
        while time.monotonic() < deadline:  # collect the others' reports and exit codes
            if self._recv(50) is None and all(p.poll() is not None for p in self.procs):
                break
        failed = [r for r, p in enumerate(self.procs)
                  if r in self.errors or p.poll() is not None] or [first_rank]
        # A rank killed by a signal, or gone without a report, is the cause; then the first
        # to report an error. Later reports are usually only peers seeing a collective break.
        reported = list(self.errors)  # in order of arrival
        failed.sort(key=lambda r: (r in self.errors, reported.index(r) if r in self.errors else r))
        parts = [f"rank {r} {self._describe(r, starting)}" for r in failed]
        raise EngineDead(f"worker {parts[0]}" + "".join(f"; then {p}" for p in parts[1:]))

    def _describe(self, rank: int, starting: bool) -> str:
        if rank in self.errors:
            return f"failed{' to start' if starting else ''}: {_error_line(self.errors[rank])}"
        code = self.procs[rank].poll()
        when = " before it was ready" if starting else ""
        if code is not None and code < 0:
            return f"was killed by {signal.Signals(-code).name}{when}"
        return f"exited with code {code}{when}"

    def execute(self, plan: StepPlan) -> None:
        """Send the plan to every rank without waiting (the engine overlaps input handling)."""
        frames = encode(MsgType.STEP, plan)
        for identity in self._identities:
            self.socket.send_multipart([identity, *frames], copy=False)

    def wait_result(self, on_idle: Callable[[], None], started_at: float | None = None
                    ) -> tuple[StepResult, list]:
        """Block until rank 0 answers: (its result, the result's extra frames); `on_idle` runs
        whenever the engine may do other work. `started_at` (monotonic) is when the workers
        could start this step; silence for `step_timeout_s` after it raises `EngineDead`."""
        timeout = self.config.step_timeout_s
        while True:
            if started_at is not None and time.monotonic() - started_at > timeout:
                raise EngineDead(self._hung_reason(time.monotonic() - started_at))
            on_idle()
            got = self._recv(_POLL_MS)
            if got is None:
                self.check_alive()
                continue
            rank, msg_type, msg, extra = got
            if msg_type == MsgType.WORKER_ERROR:
                self._raise_dead(rank)
            if msg_type == MsgType.STEP_RESULT:
                return msg, extra

    def _hung_reason(self, silent_s: float) -> str:
        stopped = [f"rank {r} is {state}" for r, p in enumerate(self.procs)
                   if (state := _process_state(p.pid)) is not None]
        return (f"worker rank 0 sent no step result for {silent_s:.1f} s (step_timeout_s = "
                f"{self.config.step_timeout_s:g}): the workers are hung"
                + (f" ({'; '.join(stopped)})" if stopped else ""))

    def shutdown(self, timeout: float = 10.0, graceful: bool = True) -> None:
        """Ask every worker to exit, SIGKILL the stragglers, remove this engine's directory.

        Not graceful (a failure): a worker stuck in a collective with a dead peer, or hung,
        cannot read SHUTDOWN, so all are SIGKILLed at once. Managed workers ignore SIGTERM
        while the engine lives, hence SIGKILL and no SIGTERM first.
        """
        if graceful:
            frames = encode(MsgType.SHUTDOWN, Shutdown("engine shutting down"))
            for identity, proc in zip(self._identities, self.procs):
                if proc.poll() is None:
                    with contextlib.suppress(zmq.ZMQError):
                        self.socket.send_multipart([identity, *frames], flags=zmq.NOBLOCK)
            self._wait_all(timeout)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        self._wait_all(5.0)
        self.socket.close(linger=0)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))


def _process_state(pid: int) -> str | None:
    """'stopped (SIGSTOP)' and the like for a process the OS reports not running normally;
    None when it runs, sleeps, or /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return {"T": "stopped (SIGSTOP)", "t": "stopped by a debugger", "Z": "a zombie",
            "D": "in uninterruptible sleep"}.get(state)
