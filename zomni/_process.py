"""Process helpers shared by every zomni process: dying with the parent, free ports, and the
private runtime directory that holds a process tree's socket files and rendezvous stores.

    $TMPDIR/zomni-XXXXXXXX/        mode 0700, made by the first process of a tree that needs one
        .zomni-owner               (`zomni serve`, a program using `LLM()`, an engine started
                                   alone); holds that process's pid
        XXXXXXXXXXXX-engine.sock   an engine core's client socket (ipc://)
        e-XXXXXXXX/                one engine core's own files (its executor makes it)
            workers.sock           the worker ROUTER
            dist-store             the torch.distributed FileStore (TP > 1)

Nothing is created straight in /tmp, and only this user can reach the sockets (the directory's
mode, not the umask, guards them). Who removes what, so that no single SIGKILL leaves anything:
- an executor removes its engine directory when it shuts down;
- the owner removes the tree directory at exit; a process that adopted it (an engine whose
  listen socket lies in it) removes it at exit once the owner is gone;
- a worker whose engine died (SIGKILLed) removes that engine's directory and listen socket,
  and the tree directory too when its owner is gone as well (the engine made it);
- a process making a new tree directory first removes this user's tree directories whose
  owner is dead (a whole tree SIGKILLed at once).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import tempfile
import uuid

_PR_SET_PDEATHSIG = 1
_OWNER_FILE = ".zomni-owner"
_PREFIX = "zomni-"


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


WORKER_TOKEN_ENV = "ZOMNI_WORKER_TOKEN"  # set by the engine's executor for its workers


def worker_identity(rank: int, token: str) -> bytes:
    """The worker socket identity of `rank`: `rank<r>-<token>` for a worker an engine started
    (the token is secret, in its environment), `rank<r>` for one started by hand (tests)."""
    return f"rank{rank}-{token}".encode() if token else f"rank{rank}".encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Runtime:
    """This process's tree directory: `path`, and whether this process made it."""

    path: str | None = None
    owned: bool = False


def runtime_dir() -> str:
    """The process tree's private directory (see the module docstring); made on first use."""
    if _Runtime.path is None or not os.path.isdir(_Runtime.path):
        _remove_stale_dirs()
        path = tempfile.mkdtemp(prefix=_PREFIX)  # mode 0700 whatever the umask
        with open(os.path.join(path, _OWNER_FILE), "w") as f:
            f.write(f"{os.getpid()}\n")
        _use(path, owned=True)
    return _Runtime.path


def adopt_runtime_dir(path: str) -> bool:
    """Use `path`, an ancestor's tree directory, as this process's; False if it is not one."""
    if not is_runtime_dir(path):
        return False
    _use(path, owned=False)
    return True


def _use(path: str, owned: bool) -> None:
    if _Runtime.path is None:
        atexit.register(release_runtime_dir)
    _Runtime.path, _Runtime.owned = path, owned


def release_runtime_dir() -> None:
    """At exit: remove the tree directory if this process made it or its maker is gone."""
    path = _Runtime.path
    if path is not None and (_Runtime.owned or not owner_alive(path)):
        shutil.rmtree(path, ignore_errors=True)
        _Runtime.path = None


def new_ipc_address(name: str) -> str:
    """A fresh ipc:// address in the tree's private directory."""
    return f"ipc://{os.path.join(runtime_dir(), f'{uuid.uuid4().hex[:12]}-{name}.sock')}"


def ipc_path(address: str) -> str | None:
    """The file of an ipc:// address; None for another transport."""
    return address[len("ipc://"):] if address.startswith("ipc://") else None


def is_runtime_dir(path: str) -> bool:
    """True for a tree directory of this user: named zomni-*, with an owner file, mode 0700."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (os.path.basename(path.rstrip("/")).startswith(_PREFIX)
            and os.path.isfile(os.path.join(path, _OWNER_FILE))
            and st.st_uid == os.getuid() and st.st_mode & 0o077 == 0)


def owner_alive(path: str) -> bool:
    """Whether the process that made tree directory `path` still runs (a zombie does not)."""
    try:
        with open(os.path.join(path, _OWNER_FILE)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the pid now belongs to another user's process: ours is gone
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: trust kill()


def remove_orphaned_engine_files(engine_dir: str, listen: str) -> None:
    """A worker whose engine died removes the engine's directory and listen socket file (when
    it lies in a tree directory), then the tree directory if its owner is gone too."""
    tree = os.path.dirname(engine_dir.rstrip("/"))
    if not is_runtime_dir(tree):
        return
    shutil.rmtree(engine_dir, ignore_errors=True)
    listen_path = ipc_path(listen)
    if listen_path and os.path.dirname(listen_path) == tree:
        with contextlib.suppress(OSError):
            os.unlink(listen_path)
    if not owner_alive(tree):
        shutil.rmtree(tree, ignore_errors=True)


def _remove_stale_dirs() -> None:
    """Remove this user's tree directories whose owner is dead (a tree SIGKILLed at once)."""
    top = tempfile.gettempdir()
    with contextlib.suppress(OSError), os.scandir(top) as entries:
        for entry in entries:
            if (entry.name.startswith(_PREFIX) and entry.is_dir(follow_symlinks=False)
                    and is_runtime_dir(entry.path) and not owner_alive(entry.path)):
                shutil.rmtree(entry.path, ignore_errors=True)
