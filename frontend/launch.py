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

# Models shipped with the package: API name -> folder under zomni/. `--model NAME` (and
# `LLM(model=NAME)`) loads the folder unless a local path NAME exists; the engine then reports
# the folder's path, which `served_name` maps back to NAME.
DEMO_MODELS = {"zomni-demo": "demo_model", "zomni-demo-image": "demo_image_model",
               "zomni-demo-dllm": "demo_dllm_model"}
DEMO_MODEL_NAME = "zomni-demo"  # the default model


def demo_path(name: str) -> str:
    """The folder of the shipped model `name` (a key of DEMO_MODELS) in this install."""
    import zomni

    path = Path(zomni.__file__).parent / DEMO_MODELS[name]
    if not ((path / "config.json").is_file() or (path / "model_index.json").is_file()):
        raise InvalidRequest(f"the bundled model {name} is missing from this install "
                             f"({path})", param="model")
    return str(path)


def default_model() -> str:
    """The demo model shipped with the package, used when no model is given."""
    return demo_path(DEMO_MODEL_NAME)


def resolve_model(model: str | None) -> str:
    """The folder to load for `model`: a shipped model's by its name, the default model for
    None, else `model` itself (a path)."""
    if model is None:
        return default_model()
    if model in DEMO_MODELS and not Path(model).exists():
        return demo_path(model)
    return model


def served_name(model: str) -> str:
    """The model's name in the API: its path as given (as vLLM), or its name (`zomni-demo`,
    `zomni-demo-image`) for a model shipped with the package.

    A shipped model is recognised by where it sits in a zomni package, e.g.
    `.../zomni/demo_model` (as given, or once symlinks are resolved), not by this install's
    path: the path comes from the engine's READY, and the engine may run from another install
    (another virtualenv, another machine, where the path need not exist here).
    """
    path = Path(model)
    for candidate in (path, path.resolve()):
        for name, folder in DEMO_MODELS.items():
            if candidate.parts[-2:] == ("zomni", folder):
                return name
    return model


def make_config(model: str | None, online_default: bool = False, **kwargs) -> EngineConfig:
    """An EngineConfig from keyword arguments (vLLM names) and `ZOMNI_*` variables;
    `online` is `online_default` unless one of them sets it."""
    if kwargs.get("online") is None and "ZOMNI_ONLINE" not in os.environ:
        kwargs["online"] = online_default
    return EngineConfig.from_env(model=resolve_model(model), **kwargs)


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
