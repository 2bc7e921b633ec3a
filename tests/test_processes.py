"""Process lifecycle: nothing is left behind after shutdown or when the parent is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

from zomni import LLM, SamplingParams


def wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    return alive


def test_shutdown_leaves_no_process(llama_dir):
    llm = LLM(model=str(llama_dir), num_kv_blocks=64)
    children = psutil.Process().children(recursive=True)
    assert len(children) >= 2  # engine core and one worker
    llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=2), use_tqdm=False)
    llm.shutdown()
    assert wait_gone([c.pid for c in children]) == []


def test_killed_parent_leaves_no_process(llama_dir, tmp_path):
    script = textwrap.dedent(f"""
        import os, sys, psutil
        from zomni import LLM
        llm = LLM(model={str(llama_dir)!r}, num_kv_blocks=64)
        pids = [c.pid for c in psutil.Process().children(recursive=True)]
        print(" ".join(map(str, pids)), flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) >= 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_gone(pids) == []
