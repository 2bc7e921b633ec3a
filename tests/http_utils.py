"""Helpers of the HTTP tests: real `zomni` processes on loopback, and a scripted model.

The scripted model is a tiny llama whose attention and MLP outputs are zeroed, so the next
token depends on the current token only; embeddings and lm_head are then set so that greedy
decoding from `START` walks a chosen token chain. Its replies are therefore known exactly,
including characters the byte-level tokenizer splits across tokens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from zomni._process import free_port
from zomni.testing import build_model

# Multi-byte characters of 2, 3 and 4 bytes, and ASCII words a stop string can span.
SCRIPT_TEXT = "Hé日語🙂 brown fox!"
EOS_ID = 2  # <|im_end|> in zomni.testing's tokenizer


def build_scripted_model(path: Path) -> tuple[Path, list[int], int]:
    """(model dir, the chain's token ids, the token that starts it).

    After the start token (the last token of every chat prompt: the newline after
    `<|im_start|>assistant`), greedy decoding yields `chain` and then EOS.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    build_model(path, "llama", shape="tiny", seed=7)
    tok = AutoTokenizer.from_pretrained(path)
    start = tok.encode("\n")[-1]
    chain = tok.encode(SCRIPT_TEXT)
    walk = [start, *chain]
    assert len(set(walk)) == len(walk), "the chain must not repeat a token"
    weights = load_file(path / "model.safetensors")
    for name, w in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w.zero_()
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    assert len(walk) < embed.shape[1]
    for k, (token, nxt) in enumerate(zip(walk, [*chain, EOS_ID])):
        # token -> basis vector k; after the final RMSNorm it is sqrt(hidden) * e_k, so
        # row `nxt` of lm_head gets a logit of 10 * sqrt(hidden), far above any other.
        embed[token] = 0.0
        embed[token, k] = 1.0
        head[nxt] = 0.0
        head[nxt, k] = 10.0
    save_file({k: v.contiguous() for k, v in weights.items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    return path, chain, start


_BUILT: dict[Path, tuple[Path, list[int], int]] = {}


def scripted_model(tmp_path_factory) -> tuple[Path, list[int], int]:
    """`build_scripted_model` once per test session, whichever module asks first."""
    root = tmp_path_factory.getbasetemp() / "scripted-llama"
    if root not in _BUILT:
        _BUILT[root] = build_scripted_model(root)
    return _BUILT[root]


def zomni_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "zomni.frontend.cli", *args]


class Proc:
    """A `zomni` process started by a test; killed at teardown whatever happened."""

    def __init__(self, args: list[str], log: Path, port: int | None = None):
        self.port = port
        self.log = log
        env = dict(os.environ, ZOMNI_LOG_LEVEL="INFO")
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}:\n{self.output()}")
            if http("GET", self.base_url + "/health")[0] == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"not healthy after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_serve(model: Path, log: Path, *extra: str) -> Proc:
    port = free_port()
    return Proc(zomni_cmd("serve", "--model", str(model), "--port", str(port),
                          "--num-kv-blocks", "256", "--num-threads", "1", *extra),
                log, port)


def http(method: str, url: str, body: bytes | dict | None = None,
         headers: dict[str, str] | None = None, timeout: float = 30.0
         ) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one plain HTTP request; (0, {}, b"") if none could be made."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, {}, b""


def engine_stats(base_url: str, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    status, _, body = http("GET", base_url + "/stats", headers=headers)
    assert status == 200, body
    return json.loads(body)


def wait_idle(base_url: str, timeout: float = 20.0, api_key: str | None = None) -> dict:
    """Poll /stats until the engine runs and queues nothing; returns the last stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine_stats(base_url, api_key)
        if stats["num_running"] == 0 and stats["num_waiting"] == 0 \
                or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)
