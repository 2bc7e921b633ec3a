"""A minimal custom frontend: attach to a running engine with nothing but `zomni.proto` and ZMQ.

    zomni engine --model PATH --listen tcp://127.0.0.1:5555      # in another terminal
    python examples/custom_frontend.py --engine tcp://127.0.0.1:5555 --prompt-ids 5 6 7

It says HELLO, waits for READY, sends one REQUEST (token ids: the engine never sees text) and
prints the token ids of every OUTPUTS message as they stream in. A client in another language
does the same with ZMQ and msgpack alone; `proto/SCHEMA.md` describes every message.

An engine started with `--curve-keys-dir DIR` (keys from `zomni keys generate DIR`) answers only
CURVE clients that know its public key: pass `--server-key DIR/server.key`. This client then
makes itself a key pair on the fly, unless `--client-key NAME.key_secret` names one (needed
when the engine admits only the clients listed in DIR/clients/).
"""

from __future__ import annotations

import argparse
import uuid

import zmq

from zomni.proto import (
    PROTOCOL_VERSION,
    SCHEMA_HASH,
    EngineRequest,
    FinishReason,
    Hello,
    MsgType,
    SamplingParams,
    decode,
    encode,
)
from zomni.proto.keys import apply_client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="tcp://127.0.0.1:5555")
    parser.add_argument("--prompt-ids", type=int, nargs="+", default=[5, 6, 7])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per message")
    parser.add_argument("--server-key", help="the engine's CURVE public key (z85 text, its "
                        "server.key file, or the keys directory); for --curve-keys-dir engines")
    parser.add_argument("--client-key", help="this client's NAME.key_secret (default: a fresh "
                        "key pair)")
    args = parser.parse_args()

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)  # the engine's ROUTER routes replies by this identity
    sock.setsockopt(zmq.IDENTITY, f"custom-{uuid.uuid4().hex}".encode())
    sock.setsockopt(zmq.LINGER, 0)
    if args.server_key:  # CURVE: encrypted, and only for those who know the engine's key
        apply_client(sock, args.server_key, args.client_key)
    sock.connect(args.engine)

    def recv():
        if not sock.poll(int(args.timeout * 1000)):
            raise SystemExit(f"no message from the engine in {args.timeout:.0f} s")
        msg_type, msg, _ = decode(sock.recv_multipart())
        if msg_type in (MsgType.ERROR, MsgType.ENGINE_DEAD):
            raise SystemExit(f"engine says {msg_type.name}: {msg}")
        return msg_type, msg

    sock.send_multipart(encode(MsgType.HELLO, Hello(PROTOCOL_VERSION, SCHEMA_HASH, "custom")))
    _, ready = recv()
    print(f"connected: {ready.model.model} ({ready.model.architecture}), "
          f"max_model_len {ready.model.details.max_model_len}")

    request_id = uuid.uuid4().hex
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    sock.send_multipart(encode(MsgType.REQUEST,
                               EngineRequest(request_id, args.prompt_ids, params)))
    done = False
    while not done:
        msg_type, msg = recv()
        if msg_type != MsgType.OUTPUTS:
            continue
        for out in msg.outputs:  # one OUTPUTS per engine step, for this client's requests
            if out.request_id != request_id:
                continue
            print("tokens:", *out.new_token_ids, flush=True)
            if out.finish_reason is not None:
                if out.finish_reason == FinishReason.ERROR:
                    raise SystemExit(f"{out.error_kind}: {out.error}")
                print("finished:", FinishReason(out.finish_reason))
                done = True
    sock.close()
    ctx.term()


if __name__ == "__main__":
    main()
