"""A custom frontend asking an image engine for pictures, with `zomni.proto` and ZMQ only.

    zomni engine --model /path/to/sd3-pipeline --listen tcp://127.0.0.1:5556   # elsewhere
    python examples/custom_image_client.py --engine tcp://127.0.0.1:5556 \\
        --prompt "a red circle on a blue background" --n 2 --seed 42 --out /tmp/images

    # a class-conditional model (DiT): class labels instead of a prompt
    python examples/custom_image_client.py --engine tcp://127.0.0.1:5556 --class-labels 207 360

It says HELLO, reads the model's defaults and size rules from READY, sends one REQUEST with an
`ImageRequest`, and waits for its `ImageOutput`: the pixels arrive as a raw extra frame of the
OUTPUTS message (uint8 [n, height, width, 3]), which `read_array` views without copying. The
images are written as PNG files with Pillow when it is installed, else as raw .npy arrays.
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

import numpy as np
import zmq

from zomni.proto import (
    PROTOCOL_VERSION,
    SCHEMA_HASH,
    FinishReason,
    Hello,
    ImageParams,
    ImageRequest,
    ModelKind,
    MsgType,
    decode,
    encode,
)
from zomni.proto.arrays import read_array


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="tcp://127.0.0.1:5556")
    parser.add_argument("--prompt")
    parser.add_argument("--class-labels", type=int, nargs="+")
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--size", help="WxH; the model's default when left out")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", default="images")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per message")
    args = parser.parse_args()

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)  # the engine's ROUTER routes replies by this identity
    sock.setsockopt(zmq.IDENTITY, f"custom-{uuid.uuid4().hex}".encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(args.engine)

    def recv():
        if not sock.poll(int(args.timeout * 1000)):
            raise SystemExit(f"no message from the engine in {args.timeout:.0f} s")
        msg_type, msg, frames = decode(sock.recv_multipart())
        if msg_type in (MsgType.ERROR, MsgType.ENGINE_DEAD):
            raise SystemExit(f"engine says {msg_type.name}: {msg}")
        return msg_type, msg, frames

    sock.send_multipart(encode(MsgType.HELLO, Hello(PROTOCOL_VERSION, SCHEMA_HASH, "custom")))
    _, ready, _ = recv()
    info = ready.model
    if info.kind != ModelKind.IMAGE:
        raise SystemExit(f"{info.model} is an {info.kind} model, not an image model")
    d = info.details
    print(f"connected: {info.model} ({info.architecture}), {d.conditioning}-conditioned, "
          f"default {d.default_width}x{d.default_height}, sizes multiples of "
          f"{d.size_multiple} up to {d.max_width}x{d.max_height}")

    width, height = map(int, args.size.split("x")) if args.size else (None, None)
    request = ImageRequest(uuid.uuid4().hex, prompt=args.prompt, class_labels=args.class_labels,
                           params=ImageParams(n=args.n, height=height, width=width,
                                              num_inference_steps=args.steps, seed=args.seed))
    sock.send_multipart(encode(MsgType.REQUEST, request))
    while True:
        msg_type, msg, frames = recv()
        for out in msg.outputs if msg_type == MsgType.OUTPUTS else ():
            if out.request_id != request.request_id or out.finish_reason is None:
                continue
            if out.finish_reason != FinishReason.STOP:
                raise SystemExit(f"{FinishReason(out.finish_reason)}: {out.error_kind} "
                                 f"{out.error}")
            save(read_array(out.pixels, frames), Path(args.out))
            print(f"done in {out.num_steps} steps ({out.queue_time_s:.2f} s queued)")
            sock.close()
            ctx.term()
            return


def save(pixels: np.ndarray, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        from PIL import Image
    except ImportError:
        Image = None
    for i, image in enumerate(pixels):
        path = out_dir / (f"image-{i}.png" if Image else f"image-{i}.npy")
        if Image:
            Image.fromarray(image).save(path)
        else:
            np.save(path, image)
        print("wrote", path)


if __name__ == "__main__":
    main()
