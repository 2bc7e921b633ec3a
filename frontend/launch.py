"""Starting and stopping a local engine-core process (which starts its own workers)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from zomni._process import new_ipc_address
from zomni.proto import EngineConfig, InvalidRequest
from zomni.proto.config import to_json

logger = logging.getLogger("zomni")

def default_model() -> str:
    """The demo model shipped with the package, used when no model is given."""
    import zomni

    path = Path(zomni.__file__).parent / "demo_model"
    if not (path / "config.json").is_file():
        raise InvalidRequest("no model given and the bundled demo model is missing",
                             param="model")
    return str(path)


DEMO_MODEL_NAME = "zomni-demo"
_DEMO_TAIL = ("zomni", "demo_model")  # where the demo sits in any install of the package


def served_name(model: str) -> str:
    """The model's name in the API: its path as given (as vLLM), or `zomni-demo` for the
    bundled demo model.

    The demo is recognised by where it sits in a zomni package, `.../zomni/demo_model` (as
    given, or once symlinks are resolved), not by this install's path: the path comes from the
    engine's READY, and the engine may run from another install (another virtualenv, another
    machine, where the path need not exist here).
    """
    path = Path(model)
    for candidate in (path, path.resolve()):
        if candidate.parts[-2:] == _DEMO_TAIL:
            return DEMO_MODEL_NAME
    return model


def make_config(model: str | None, online_default: bool = False, **kwargs) -> EngineConfig:
    """An EngineConfig from keyword arguments (vLLM names) and `ZOMNI_*` variables;
    `online` is `online_default` unless one of them sets it."""
    if kwargs.get("online") is None and "ZOMNI_ONLINE" not in os.environ:
        kwargs["online"] = online_default
    return EngineConfig.from_env(model=model or default_model(), **kwargs)


class EngineProcess:
    """A child engine-core process listening on `address`."""

    def __init__(self, config: EngineConfig):
        if not config.listen:
            config.listen = new_ipc_address("engine")
        self.address = config.listen
        self.config = config
        self.proc = subprocess.Popen([sys.executable, "-m", "zomni.core.engine",
                                      to_json(config)])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def shutdown(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("engine did not stop in %.0f s; killing it", timeout)
            self.proc.kill()
            self.proc.wait()
