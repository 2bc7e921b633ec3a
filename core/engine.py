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

Clients (`clients.py`): a client must say HELLO first; anything else before it is refused
(ERROR, or an error output for a REQUEST). Request ids are scoped per client, so a client's
ABORT and outputs concern its own requests only. With `curve_keys_dir` the socket is a CURVE
server (`proto/keys.py`): a peer without the server's key cannot even connect.

Liveness. PONG means "the loop runs and no step is overdue": PINGs are answered between steps
and, while the loop waits for a step's result, from that wait (`_on_step_idle`) as long as the
step is younger than `step_timeout_s`; everything else waits for the step's end. A step older
than that is a hung worker: `wait_result` raises EngineDead (no PONG comes after that), every
open request gets an EngineDead error output, then ENGINE_DEAD, and the engine exits.

Shutdown. SIGTERM / SIGINT start a drain: new HELLOs, REQUESTs and PINGs are answered with
EngineDead "shutting down" (a frontend maps it to 503), requests in flight run on for up to
`drain_timeout_s`, the rest then end with an EngineDead error output, every client gets
ENGINE_DEAD, and the engine stops its workers and exits. A second signal ends the drain now.
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

from zomni._process import adopt_runtime_dir, die_with_parent, ipc_path
from zomni.proto import (
    PROTOCOL_VERSION,
    SCHEMA_HASH,
    EngineConfig,
    EngineDead,
    EngineDeadMsg,
    EngineOutputs,
    EngineOverloaded,
    ErrorMsg,
    InvalidRequest,
    MsgType,
    ProtocolMismatch,
    Ready,
    Stats,
    ZomniError,
)
from zomni.proto.arrays import regroup
from zomni.proto.config import from_json
from zomni.proto.messages import Empty, Request, StepPlan
from zomni.proto.model_info import read_model_info

from .clients import Client, ClientSocket, ClientTable, Refusal, decode_client_message
from .executor import Executor
from .scheduler_interface import Outputs, make_scheduler

logger = logging.getLogger("zomni.engine")

_IDLE_POLL_MS = 1000


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.ctx = zmq.Context()
        self.socket = ClientSocket(self.ctx, config)
        self.pending: list[tuple[bytes, MsgType, object, list]] = []
        self.clients = ClientTable()
        self.drain_deadline: float | None = None  # monotonic; set by a signal
        self._drain_logged = False
        self._dead_sent = False
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
        self.max_in_flight = self.scheduler.max_plans_in_flight
        self.num_steps_total = 0
        self._step_times: collections.deque[tuple[float, float]] = collections.deque()
        self._last_result = 0.0
        logger.info("engine ready in %.1f s: %s (%s), dtype %s, %s, %s, %s scheduling, TP=%d "
                    "(weights per rank: %s MiB), listening on %s%s",
                    time.monotonic() - start, self.info.architecture, self.info.kind,
                    self.info.dtype, self.info.details, self.runner_info,
                    "async" if self.max_in_flight > 1 else "sync", config.tensor_parallel_size,
                    ", ".join(f"{b / 2**20:.1f}" for b in self.executor.weight_bytes),
                    config.listen, " (CURVE)" if config.curve_keys_dir else "")

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
            for identity, msg_type, _msg, _arrays in self.pending:
                if identity not in answered:
                    answered.add(identity)
                    self.socket.send(identity, MsgType.ERROR, ErrorMsg(
                        type(error).__name__, error.message, reply_to=msg_type))
            self.pending = []
            if answered:
                break
        self._close_sockets()

    # ---- main loop ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._drained():
                busy = self._busy()
                self._receive(timeout_ms=0 if busy else _IDLE_POLL_MS)
                self._apply_inputs()
                if not busy:
                    self.executor.check_alive()
                if self._busy():
                    self.step()
        except EngineDead as e:
            logger.error("engine failed: %s", e)
            self._fail_open_requests(e)
            self._broadcast_dead(str(e))
            self.shutdown(failed=True)
            raise
        finally:
            self.shutdown()

    def _busy(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.in_flight)

    def step(self) -> None:
        """Send the next plan (if there is work), then apply the oldest plan's result once
        `max_in_flight` plans are out or nothing new was sent."""
        plan = self.scheduler.schedule()
        if plan is not None:
            self.executor.execute(plan)
            self.in_flight.append((plan, time.monotonic()))
        if self.in_flight and (len(self.in_flight) >= self.max_in_flight or plan is None):
            done, sent_at = self.in_flight.popleft()
            # The watchdog's clock starts when the workers could start this step.
            result, frames = self.executor.wait_result(
                on_idle=self._on_step_idle, started_at=max(sent_at, self._last_result))
            if result.step_id != done.step_id or type(result).__struct_config__.tag != \
                    type(done).__struct_config__.tag:
                raise EngineDead(f"worker answered step {result.step_id} "
                                 f"({type(result).__name__}), expected {done.step_id}")
            self._record_step(sent_at)
            self._send_outputs(self.scheduler.update_from_output(done, result, frames), frames)

    def _on_step_idle(self) -> None:
        """While a step runs (and is not overdue, which `wait_result` checks first)."""
        self._receive(timeout_ms=0, answer_pings=True)

    def _record_step(self, sent_at: float) -> None:
        """A step's time: from when the workers could start it (its plan sent, or the step
        before it done) to its result."""
        now = time.monotonic()
        self._step_times.append((now, now - max(sent_at, self._last_result)))
        self._last_result = now
        self.num_steps_total += 1
        while now - self._step_times[0][0] > 10.0:
            self._step_times.popleft()

    # ---- shutdown -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """From the signal handler: start draining; a second signal ends the drain now."""
        now = time.monotonic()
        if self.drain_deadline is None:
            self.drain_deadline = now + self.config.drain_timeout_s
        else:
            self.drain_deadline = now

    @property
    def draining(self) -> bool:
        return self.drain_deadline is not None

    def _drained(self) -> bool:
        """True once a drain is over: nothing in flight, or the deadline passed (then every
        open request gets its EngineDead error output)."""
        if self.drain_deadline is None:
            return False
        if not self._drain_logged:
            self._drain_logged = True
            logger.info("shutting down: %d requests in flight get up to %g s to finish",
                        sum(len(c.open) for _, c in self.clients), self.config.drain_timeout_s)
        if not self._busy():
            return True
        if time.monotonic() < self.drain_deadline:
            return False
        self._fail_open_requests(EngineDead(
            "the engine shut down before this request finished (drain_timeout_s = "
            f"{self.config.drain_timeout_s:g})"))
        return True

    def _fail_open_requests(self, error: ZomniError) -> None:
        """End every open request with `error` (the engine is going away: the scheduler's
        state no longer matters)."""
        for identity, client in self.clients:
            if client.open:
                outs = [self.scheduler.error_output(rid, error) for rid in sorted(client.open)]
                client.open.clear()
                self.socket.send(identity, MsgType.OUTPUTS, EngineOutputs(outs, time.time()))

    def _broadcast_dead(self, reason: str) -> None:
        if not self._dead_sent:
            self._dead_sent = True
            for identity, _client in self.clients:
                self.socket.send(identity, MsgType.ENGINE_DEAD, EngineDeadMsg(reason))

    def shutdown(self, failed: bool = False) -> None:
        """Stop the workers (after a failure without waiting for them: some may be stuck in a
        collective), lingering so the last messages reach the clients."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self._broadcast_dead("engine shut down")
        self.executor.shutdown(graceful=not failed)
        self._close_sockets()

    def _close_sockets(self) -> None:
        self.socket.close()
        self.ctx.term()
        self.socket.remove_file()

    # ---- inputs ----------------------------------------------------------------------------

    def _receive(self, timeout_ms: int, answer_pings: bool = False) -> None:
        """Decode every waiting client message into `pending`; never applies them. With
        `answer_pings`, a known client's PING is answered at once instead."""
        for identity, frames in self.socket.receive(timeout_ms):
            got = decode_client_message(frames)
            if isinstance(got, Refusal):
                self._refuse_undecodable(identity, got)
                continue
            msg_type, msg, arrays = got
            if (answer_pings and msg_type == MsgType.PING and not self.draining
                    and self.clients.peek(identity) is not None):
                self.socket.send(identity, MsgType.PONG, Empty())
                continue
            self.pending.append((identity, msg_type, msg, arrays))

    def _refuse_undecodable(self, identity: bytes, refusal: Refusal) -> None:
        """An error output for a REQUEST whose id can be read (from a client that said HELLO,
        once the engine runs), else an ERROR."""
        if refusal.request_id is not None and hasattr(self, "scheduler") \
                and self.clients.peek(identity) is not None:
            out = self.scheduler.error_output(refusal.request_id, refusal.error)
            self.socket.send(identity, MsgType.OUTPUTS, EngineOutputs([out], time.time()))
        else:
            self.socket.send(identity, MsgType.ERROR, ErrorMsg(
                type(refusal.error).__name__, refusal.error.message, reply_to=refusal.msg_type))

    def _apply_inputs(self) -> None:
        pending, self.pending = self.pending, []
        for identity, msg_type, msg, _arrays in pending:
            if msg_type == MsgType.HELLO:
                self._hello(identity, msg)
                continue
            client = self.clients.get(identity)
            if client is None:
                self._refuse(identity, msg_type, msg, ProtocolMismatch(
                    f"say HELLO first: {msg_type.name} from a client that has not"))
            elif msg_type == MsgType.REQUEST:
                self._add_request(identity, client, msg)
            elif msg_type == MsgType.ABORT:
                scoped = [client.scoped(r) for r in msg.request_ids if r in client.open]
                self._send_outputs(self.scheduler.abort_requests(scoped))
            elif msg_type == MsgType.PING and self.draining:
                self._refuse(identity, msg_type, msg, EngineDead("the engine is shutting down"))
            elif msg_type == MsgType.PING:
                self.socket.send(identity, MsgType.PONG, Empty())
            elif msg_type == MsgType.GET_STATS:
                self.socket.send(identity, MsgType.STATS, self.stats())
            else:
                self._refuse(identity, msg_type, msg,
                             InvalidRequest(f"unexpected {msg_type.name} message"))

    def _refuse(self, identity: bytes, msg_type: MsgType, msg, error: ZomniError) -> None:
        """A REQUEST's refusal is its error output; any other message's an ERROR."""
        if msg_type == MsgType.REQUEST:
            out = self.scheduler.error_output(msg.request_id, error)
            self.socket.send(identity, MsgType.OUTPUTS, EngineOutputs([out], time.time()))
        else:
            self.socket.send(identity, MsgType.ERROR,
                       ErrorMsg(type(error).__name__, error.message, reply_to=msg_type))

    def _hello(self, identity: bytes, hello) -> None:
        if hello.protocol_version != PROTOCOL_VERSION or hello.schema_hash != SCHEMA_HASH:
            error: ZomniError = ProtocolMismatch(
                f"client speaks protocol {hello.protocol_version} (schema {hello.schema_hash}), "
                f"engine speaks {PROTOCOL_VERSION} (schema {SCHEMA_HASH})")
        elif self.draining:
            error = EngineDead("the engine is shutting down")
        elif self.clients.hello(identity, hello.client_name) is None:
            error = EngineOverloaded(f"{len(self.clients)} clients with requests in flight "
                                     "are attached; retry later")
        else:
            self.socket.send(identity, MsgType.READY, Ready(
                PROTOCOL_VERSION, SCHEMA_HASH, self.info, self.runner_info))
            return
        self._refuse(identity, MsgType.HELLO, hello, error)

    def _add_request(self, identity: bytes, client: Client, req: Request) -> None:
        request_id = req.request_id
        if self.draining:
            error: ZomniError = EngineDead("the engine is shutting down: no new requests")
        elif request_id in client.open:
            error = InvalidRequest(f"request id {request_id!r} is already in use",
                                   param="request_id")
        else:
            req.request_id = client.scoped(request_id)
            try:
                self.scheduler.add_request(req, identity)
            except ZomniError as e:
                error = e
            except Exception as e:  # noqa: BLE001 - a scheduler bug must not end the engine
                logger.exception("refusing request %r", request_id)
                error = ZomniError(f"internal error: {type(e).__name__}: {e}")
            else:
                client.open.add(request_id)
                return
        req.request_id = request_id
        self._refuse(identity, MsgType.REQUEST, req, error)

    # ---- outputs ---------------------------------------------------------------------------

    def _send_outputs(self, outputs: Outputs, frames: list | tuple = ()) -> None:
        """One OUTPUTS message per client, under the client's own request ids; arrays the
        outputs point at go with their client's message as extra frames (`regroup` renumbers
        the references)."""
        now = time.time()
        for identity, outs in outputs.items():
            client = self.clients.peek(identity)
            outs = ClientTable.unscope(client, outs) if client is not None else []
            if outs:
                arrays = regroup(outs, frames) if frames else ()
                self.socket.send(identity, MsgType.OUTPUTS, EngineOutputs(outs, now), arrays)

    def stats(self) -> Stats:
        times = [t for _, t in self._step_times]
        return Stats(scheduler=self.scheduler.get_stats(), num_steps_total=self.num_steps_total,
                     step_time_s=sum(times) / len(times) if times else 0.0)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    logging.basicConfig(level=os.environ.get("ZOMNI_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = from_json(argv[0], EngineConfig)
    listen = ipc_path(config.listen)
    if listen:  # in the private directory of whoever started us: share it (zomni._process)
        adopt_runtime_dir(os.path.dirname(listen))
    logger.info("engine config: %s", config)
    engine_box: list[EngineCore] = []

    def stop(signum, _frame):
        if engine_box:
            engine_box[0].request_stop()
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
