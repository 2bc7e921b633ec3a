"""Shared fixtures: tiny random-weight HF models, built once per session and reused."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from zomni.testing import ARCHS, build_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """arch name -> directory of a tiny random-weight model of that architecture."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model(root / arch, arch, shape="tiny", seed=i)
            for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> Path:
    return model_dirs["llama"]


@pytest.fixture(scope="module")
def loop():
    """One event loop per test module: an AsyncLLM's client reader lives in the loop it was
    started in."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def start_async_llm(loop):
    """`start_async_llm(model_dir, **engine_args)`: an AsyncLLM started in the module's `loop`,
    shut down once the module's tests are done."""
    from zomni import AsyncLLM

    started = []

    def start(model_dir, **engine_args):
        llm = AsyncLLM(model=str(model_dir), **engine_args)
        loop.run_until_complete(llm.start())
        started.append(llm)
        return llm

    yield start
    for llm in started:
        llm.shutdown()
    loop.run_until_complete(asyncio.sleep(0))  # let the clients' reader tasks finish cancelling


@pytest.fixture(scope="session")
def dllm_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight masked-diffusion LMs in their hub layouts: "llada" and "dream"."""
    from zomni.testing_dllm import build_dream_model, build_llada_model

    root = tmp_path_factory.mktemp("dllm")
    return {"llada": build_llada_model(root / "llada", seed=0),
            "dream": build_dream_model(root / "dream", seed=1)}
