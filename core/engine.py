"""The engine-core process: one loop of schedule → execute → update, overlapped with input.

    clients ──DEALER──► ROUTER (config.listen) ──► pending inputs ─┐
                                                                    ▼
        loop:  apply inputs → scheduler.schedule() → executor.execute(plan N+1)
               │  while the workers compute: receive + decode inputs (not applied yet)
               └► executor.wait_result(N) → scheduler.update_from_output(N) → send outputs

With async scheduling (the default) plan N+1 is sent before N's result is read, so the workers
find their next plan queued when they finish a step and never wait for the engine core's IPC
round trip, output handling and scheduling (~2 ms a step on 2 CPU cores, 5-15% of a decode
step). Without it, one plan at a time. Inputs are applied only between `schedule()` calls; an
abort of a request in flight only drops its later results. When there is no work the loop
blocks in `poll` (woken by a message or every second to check its workers): nothing spins.
The loop never looks at the model's kind: the scheduler for the kind (`scheduler_interface`)
builds plans and outputs, the workers' runners execute them; arrays in a step's result (pixels)
are forwarded to each client as raw frames, never copied into a message body.
Run it as `python -m zomni.core.engine '<EngineConfig JSON>'`.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import sys
import time

import zmq

from zomni._process import die_with_parent
from zomni.proto import (
    PROTOCOL_VERSION,
    SCHEMA_HASH,
    EngineConfig,
    EngineDead,
    EngineDeadMsg,
    EngineOutputs,
    ErrorMsg,
    InvalidRequest,
    MsgType,
    Ready,
    Stats,
    ZomniError,
    decode,
    encode,
)
from zomni.proto.arrays import regroup
from zomni.proto.config import from_json
from zomni.proto.messages import Empty, Request, StepPlan
from zomni.proto.model_info import read_model_info

from .executor import Executor
from .scheduler_interface import Outputs, make_scheduler

logger = logging.getLogger("zomni.engine")

_IDLE_POLL_MS = 1000


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.ctx = zmq.Context()
        self.clients = self.ctx.socket(zmq.ROUTER)
        self.clients.setsockopt(zmq.LINGER, 0)
        self.clients.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.clients.bind(config.listen)
        self.pending: list[tuple[bytes, MsgType, object, list]] = []
        start = time.monotonic()
        try:
            self.info = read_model_info(config.model, config.max_model_len,
                                        tensor_parallel_size=config.tensor_parallel_size)
            # Clients' HELLOs are queued while the workers load, so that a failure to start
            # can be answered with its reason (rank, error) rather than a bare exit.
            self.executor = Executor(config, self.ctx,
                                     on_idle=lambda: self._receive(timeout_ms=0))
        except ZomniError as e:
            self._fail_startup(e)
            raise
        self.info.dtype = self.executor.dtype
        self.runner_info = self.executor.runner_info  # what the workers resolved
        self.scheduler = make_scheduler(config, self.info, self.runner_info)
        # plans sent and not answered yet, with the time each was sent
        self.in_flight: collections.deque[tuple[StepPlan, float]] = collections.deque()
        self.max_in_flight = 2 if config.async_scheduling else 1
        self.known_clients: set[bytes] = set()
        self.stopping = False
        self.num_steps_total = 0
        self._step_times: collections.deque[tuple[float, float]] = collections.deque()
        self._last_result = 0.0
        logger.info("engine ready in %.1f s: %s (%s), dtype %s, %s, %s scheduling, TP=%d "
                    "(weights per rank: %s MiB), listening on %s",
                    time.monotonic() - start, self.info.architecture, self.info.kind,
                    self.info.dtype, self.info.details, self.runner_info,
                    "async" if config.async_scheduling else "sync", config.tensor_parallel_size,
                    ", ".join(f"{b / 2**20:.1f}" for b in self.executor.weight_bytes),
                    config.listen)

    def _fail_startup(self, error: ZomniError) -> None:
        """Tell every client that said anything (within a second) why the engine cannot start.

        A client's HELLO may still be in flight when the failure is immediate (a config error),
        hence the short linger; an engine started alone exits one second later than it could.
        """
        logger.error("engine failed to start: %s", error)
        answered: set[bytes] = set()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            self._receive(timeout_ms=100)
            for identity, _msg_type, _msg, _arrays in self.pending:
                if identity not in answered:
                    answered.add(identity)
                    self._send(identity, MsgType.ERROR,
                               ErrorMsg(type(error).__name__, error.message))
            self.pending = []
            if answered:
                break
        self.clients.close(linger=500)  # let the answers leave before the process exits
        self.ctx.term()

    # ---- main loop ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self.stopping:
                busy = self.scheduler.has_unfinished_requests() or bool(self.in_flight)
                self._receive(timeout_ms=0 if busy else _IDLE_POLL_MS)
                self._apply_inputs()
                if not busy:
                    self.executor.check_alive()
                if self.scheduler.has_unfinished_requests() or self.in_flight:
                    self.step()
        except EngineDead as e:
            logger.error("engine failed: %s", e)
            self._broadcast_dead(str(e))
            self.shutdown(failed=True)
            raise
        finally:
            self.shutdown()

    def step(self) -> None:
        """Send the next plan (if there is work), then apply the oldest plan's result once
        `max_in_flight` plans are out or nothing new was sent."""
        plan = self.scheduler.schedule()
        if plan is not None:
            self.executor.execute(plan)
            self.in_flight.append((plan, time.monotonic()))
        if self.in_flight and (len(self.in_flight) >= self.max_in_flight or plan is None):
            done, sent_at = self.in_flight.popleft()
            result, frames = self.executor.wait_result(
                on_idle=lambda: self._receive(timeout_ms=0))
            if result.step_id != done.step_id or type(result).__struct_config__.tag != \
                    type(done).__struct_config__.tag:
                raise EngineDead(f"worker answered step {result.step_id} "
                                 f"({type(result).__name__}), expected {done.step_id}")
            self._record_step(sent_at)
            self._send_outputs(self.scheduler.update_from_output(done, result, frames), frames)

    def _record_step(self, sent_at: float) -> None:
        """A step's time: from when the workers could start it (its plan sent, or the step
        before it done) to its result."""
        now = time.monotonic()
        self._step_times.append((now, now - max(sent_at, self._last_result)))
        self._last_result = now
        self.num_steps_total += 1
        while now - self._step_times[0][0] > 10.0:
            self._step_times.popleft()

    # ---- inputs ----------------------------------------------------------------------------

    def _receive(self, timeout_ms: int) -> None:
        """Decode every waiting client message into `pending`; never applies them."""
        if not self.clients.poll(timeout_ms):
            return
        while True:
            try:
                identity, *frames = self.clients.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg_type, msg, arrays = decode(frames)
            except InvalidRequest as e:
                self._send(identity, MsgType.ERROR, ErrorMsg(type(e).__name__, e.message))
                continue
            self.pending.append((identity, msg_type, msg, arrays))

    def _apply_inputs(self) -> None:
        pending, self.pending = self.pending, []
        for identity, msg_type, msg, _arrays in pending:
            if msg_type == MsgType.REQUEST:
                self._add_request(identity, msg)
            elif msg_type == MsgType.ABORT:
                self._send_outputs(self.scheduler.abort_requests(msg.request_ids))
            elif msg_type == MsgType.HELLO:
                self._hello(identity, msg)
            elif msg_type == MsgType.PING:
                self._send(identity, MsgType.PONG, Empty())
            elif msg_type == MsgType.GET_STATS:
                self._send(identity, MsgType.STATS, self.stats())
            else:
                self._send(identity, MsgType.ERROR,
                           ErrorMsg("InvalidRequest", f"unexpected {msg_type.name} message"))

    def _hello(self, identity: bytes, hello) -> None:
        if hello.protocol_version != PROTOCOL_VERSION or hello.schema_hash != SCHEMA_HASH:
            self._send(identity, MsgType.ERROR, ErrorMsg(
                "ProtocolMismatch",
                f"client speaks protocol {hello.protocol_version} (schema {hello.schema_hash}), "
                f"engine speaks {PROTOCOL_VERSION} (schema {SCHEMA_HASH})"))
            return
        self.known_clients.add(identity)
        self._send(identity, MsgType.READY, Ready(PROTOCOL_VERSION, SCHEMA_HASH, self.info,
                                                  self.runner_info))

    def _add_request(self, identity: bytes, req: Request) -> None:
        self.known_clients.add(identity)
        try:
            self.scheduler.add_request(req, identity)
        except ZomniError as e:
            out = self.scheduler.error_output(req.request_id, e)
            self._send(identity, MsgType.OUTPUTS, EngineOutputs([out], time.time()))

    # ---- outputs ---------------------------------------------------------------------------

    def _send_outputs(self, outputs: Outputs, frames: list | tuple = ()) -> None:
        """One OUTPUTS message per client; arrays the outputs point at go with their client's
        message as extra frames (`regroup` renumbers the references)."""
        now = time.time()
        for identity, outs in outputs.items():
            if outs:
                arrays = regroup(outs, frames) if frames else ()
                self._send(identity, MsgType.OUTPUTS, EngineOutputs(outs, now), arrays)

    def _send(self, identity: bytes, msg_type: MsgType, msg, arrays=()) -> None:
        try:
            self.clients.send_multipart([identity, *encode(msg_type, msg, arrays)],
                                        flags=zmq.NOBLOCK, copy=not arrays)
        except zmq.ZMQError as e:  # a client that went away must not take the engine down
            logger.warning("dropping %s for a client that is gone: %s", msg_type.name, e)

    def _broadcast_dead(self, reason: str) -> None:
        for identity in self.known_clients:
            self._send(identity, MsgType.ENGINE_DEAD, EngineDeadMsg(reason))

    def stats(self) -> Stats:
        times = [t for _, t in self._step_times]
        return Stats(scheduler=self.scheduler.get_stats(), num_steps_total=self.num_steps_total,
                     step_time_s=sum(times) / len(times) if times else 0.0)

    def shutdown(self, failed: bool = False) -> None:
        """Stop the workers; after a failure without waiting for them (some may be stuck in a
        collective), and lingering so the ENGINE_DEAD messages reach the clients."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self._broadcast_dead("engine shut down")
        self.executor.shutdown(graceful=not failed)
        self.clients.close(linger=500 if failed else 0)
        self.ctx.term()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    logging.basicConfig(level=os.environ.get("ZOMNI_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = from_json(argv[0], EngineConfig)
    logger.info("engine config: %s", config)
    engine_box: list[EngineCore] = []

    def stop(signum, _frame):
        if engine_box:
            engine_box[0].stopping = True
        else:
            sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        engine_box.append(EngineCore(config))
        engine_box[0].run()
    except ZomniError as e:  # already logged with its cause; no traceback for a known error
        logger.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    main()
