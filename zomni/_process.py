"""Process helpers shared by every zomni process: dying with the parent, free ports, addresses."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import tempfile
import uuid

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux only).

    This is what guarantees no orphans when a parent is SIGKILLed and gets no chance to clean
    up. A no-op where prctl is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_ipc_address(name: str) -> str:
    """A fresh ipc:// address in a private temporary directory."""
    path = os.path.join(tempfile.gettempdir(), f"zomni-{uuid.uuid4().hex[:12]}-{name}.sock")
    return f"ipc://{path}"
