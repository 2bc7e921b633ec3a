"""Worker process: one per device. Run as `python -m zomni.workers.worker '<WorkerConfig JSON>'`.

    start ─► die_with_parent ─► DEALER "rank{r}-{token}" connects to the engine's ROUTER ─► init
    torch.distributed (world > 1) ─► the runner for the model's kind (runner.py: load weights,
    allocate caches) ─► WORKER_READY
    (a failure to start is sent as a WORKER_ERROR with step_id -1, then exit 1)
    loop:  recv (blocking) ─► STEP: runner.execute ─► rank 0 sends STEP_RESULT (+ array frames)
                           └► SHUTDOWN: exit 0
    runner.execute raises ─► this rank sends WORKER_ERROR with the traceback ─► exit 1
    SIGTERM / SIGINT ─► close the socket, destroy the process group, exit 0

The loop never looks at the kind: plans and results are the runner's business.

A worker started by an engine core is *managed* (its environment holds the identity token,
`ZOMNI_WORKER_TOKEN`): it ignores SIGTERM / SIGINT while that engine lives, because the engine
decides when its workers stop (a Ctrl-C or a systemd stop signals the whole process group; the
engine drains, then sends SHUTDOWN). When the engine dies the kernel sends SIGTERM
(`die_with_parent`; an idle worker also looks each second) and the worker exits, removing
the dead engine's private files (its socket, the distributed store: `zomni._process`). A
worker started by hand has no token, connects as "rank{r}" and exits on SIGTERM.

ZOMNI_PROFILE_DIR=<dir> profiles the serving loop and writes each rank's op table there.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import zmq

from zomni._process import (
    WORKER_TOKEN_ENV,
    die_with_parent,
    remove_orphaned_engine_files,
    worker_identity,
)
from zomni.proto import MsgType, WorkerConfig, WorkerReady, decode, encode
from zomni.proto.config import from_json
from zomni.proto.messages import WorkerError
from zomni.workers.device import resolve_device
from zomni.workers.runner import Runner, make_runner

logger = logging.getLogger("zomni.worker")


class _Terminated(BaseException):
    """Raised from the signal handler; a BaseException so no `except Exception` swallows it."""


class _Managed:
    """Set at start for a managed worker: the engine's pid (our parent then)."""

    engine_pid: int | None = None

    @classmethod
    def engine_alive(cls) -> bool:
        return cls.engine_pid is not None and os.getppid() == cls.engine_pid


def _on_signal(signum: int, frame) -> None:
    if _Managed.engine_alive():
        logger.info("ignoring %s: the engine core (pid %d) stops its workers; signal it",
                    signal.Signals(signum).name, _Managed.engine_pid)
        return
    raise _Terminated(signal.Signals(signum).name)


def init_distributed(config: WorkerConfig) -> None:
    world = config.engine.tensor_parallel_size
    if world == 1:
        return
    device = resolve_device(config.engine.device, config.rank, world)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=config.dist_init_method, rank=config.rank,
                            world_size=world)


def _report(sock: zmq.Socket, step_id: int, error: str) -> None:
    sock.send_multipart(encode(MsgType.WORKER_ERROR, WorkerError(step_id, error)))


_ENGINE_CHECK_MS = 1000  # an idle managed worker looks for its engine this often


def serve(sock: zmq.Socket, runner: Runner, rank: int,
          on_step: Callable[[], None] = lambda: None) -> int:
    """Execute step plans until SHUTDOWN (returns 0) or a failure (returns 1)."""
    while True:
        # The engine's death normally arrives as SIGTERM (die_with_parent); an idle worker
        # also checks for it itself, so a signal lost to a race cannot leave it running.
        while _Managed.engine_pid is not None and not sock.poll(_ENGINE_CHECK_MS):
            if not _Managed.engine_alive():
                raise _Terminated("engine core gone")
        frames = sock.recv_multipart()
        step_id = -1
        try:
            msg_type, msg, _ = decode(frames)
            if msg_type == MsgType.SHUTDOWN:
                logger.info("rank %d: shutdown (%s)", rank, msg.reason or "requested")
                return 0
            if msg_type != MsgType.STEP:
                raise ValueError(f"unexpected message {msg_type.name} on the worker channel")
            step_id = msg.step_id
            done = runner.execute(msg)
        except Exception:
            # Every rank reports: the engine names the rank that failed first, not rank 0
            # seeing its collective break afterwards.
            error = traceback.format_exc()
            logger.error("rank %d: step %d failed\n%s", rank, step_id, error)
            _report(sock, step_id, error)
            return 1
        if done is not None:
            result, arrays = done
            sock.send_multipart(encode(MsgType.STEP_RESULT, result, arrays), copy=False)
        on_step()


def _step_profiler(rank: int) -> Callable[[], None]:
    """With ZOMNI_PROFILE_DIR set, profile steps 8-107 of this rank (CPU ops, collectives
    included) and write their op table to <dir>/rank<r>.txt, to answer "where does the time
    go". Returns the callback to run after each step (a no-op without the variable)."""
    out_dir = os.environ.get("ZOMNI_PROFILE_DIR")
    if not out_dir:
        return lambda: None

    def write(prof: torch.profiler.profile) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (Path(out_dir) / f"rank{rank}.txt").write_text(table)

    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], on_trace_ready=write,
        # written mid-run, when the window closes: at exit the engine may not wait for it
        schedule=torch.profiler.schedule(wait=5, warmup=2, active=100, repeat=1))
    prof.start()
    return prof.step


def _start(sock: zmq.Socket, config: WorkerConfig) -> Runner:
    init_distributed(config)
    start = time.perf_counter()
    runner = make_runner(config)
    info = runner.runner_info()
    logger.info("rank %d: dtype %s, weights %.1f MB, loaded in %.2f s (ready in %.2f s): %s",
                config.rank, runner.dtype, runner.weight_bytes / 2**20, runner.load_time_s,
                time.perf_counter() - start, info)
    sock.send_multipart(encode(MsgType.WORKER_READY, WorkerReady(
        config.rank, runner.weight_bytes, runner.dtype, str(runner.device), info)))
    return runner


def run_worker(config: WorkerConfig) -> int:
    ctx = zmq.Context()
    # Connected before loading, so a failure to start reaches the engine as a message
    # (a STEP_RESULT with step_id -1 and the traceback) rather than only as an exit code.
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY,
                    worker_identity(config.rank, os.environ.get(WORKER_TOKEN_ENV, "")))
    sock.connect(config.engine_address)
    try:
        try:
            runner = _start(sock, config)
        except Exception:
            error = traceback.format_exc()
            logger.error("rank %d: failed to start\n%s", config.rank, error)
            _report(sock, -1, error)
            return 1
        return serve(sock, runner, config.rank, on_step=_step_profiler(config.rank))
    except _Terminated as e:
        logger.info("rank %d: %s, exiting", config.rank, e)
        return 0
    finally:
        engine_died = _Managed.engine_pid is not None and not _Managed.engine_alive()
        # let a final STEP_RESULT (or error) reach a live engine
        sock.close(linger=0 if engine_died else 2000)
        ctx.term()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if engine_died:
            remove_orphaned_engine_files(os.path.dirname(config.engine_address[len("ipc://"):]),
                                         config.engine.listen)


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m zomni.workers.worker '<WorkerConfig JSON>'", file=sys.stderr)
        return 2
    if os.environ.get(WORKER_TOKEN_ENV):
        _Managed.engine_pid = os.getppid()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_worker(from_json(argv[0], WorkerConfig))


if __name__ == "__main__":
    sys.exit(main())
