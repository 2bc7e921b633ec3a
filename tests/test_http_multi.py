"""Every process on its own: `zomni engine` with two `zomni frontend`s and a custom frontend.

The engine's queues are small (4 running, 8 waiting) so overload answers 429. The last tests
stop one frontend (the engine and the other go on) and kill the engine (the frontend left must
answer 503 and exit).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import openai
import psutil
import pytest
from http_utils import SCRIPT_TEXT, Proc, http, scripted_model, wait_idle, zomni_cmd

from zomni._process import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model, chain, start = scripted_model(tmp_path_factory)
    logs = tmp_path_factory.mktemp("multi")
    address = f"tcp://127.0.0.1:{free_port()}"
    procs = [Proc(zomni_cmd("engine", "--model", str(model), "--listen", address,
                            "--num-kv-blocks", "256", "--num-threads", "1",
                            "--max-num-seqs", "4", "--max-waiting-requests", "8"),
                  logs / "engine.log")]
    for name, extra in (("a", []), ("b", ["--max-inflight-requests", "4"])):
        port = free_port()
        procs.append(Proc(zomni_cmd("frontend", "--engine", address, "--port", str(port),
                                    *extra), logs / f"frontend-{name}.log", port))
    try:
        for p in procs[1:]:
            p.wait_healthy()
        yield SimpleNamespace(engine=procs[0], frontends=procs[1:], address=address,
                              model=str(model), chain=chain, prompt=[5, 6, start])
    finally:
        for p in procs:
            p.kill()


def _client(proc: Proc) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proc.base_url + "/v1", api_key="none", max_retries=0)


def test_frontend_learns_model_from_engine(cluster):
    for fe in cluster.frontends:
        models = openai.OpenAI(base_url=fe.base_url + "/v1", api_key="x").models.list()
        assert [m.id for m in models.data] == [cluster.model]


def test_two_frontends_share_one_engine(cluster):
    """Concurrent requests through both frontends each get their own, complete outputs."""
    async def one(client, max_tokens):
        out = await client.completions.create(model=cluster.model, prompt=[5, 6, 7],
                                              max_tokens=max_tokens,
                                              extra_body={"ignore_eos": True})
        return out.usage.completion_tokens

    async def run():
        a, b = (_client(fe) for fe in cluster.frontends)
        chat = b.chat.completions.create(model=cluster.model, temperature=0,
                                         messages=[{"role": "user", "content": "hi"}])
        return await asyncio.gather(one(a, 40), one(a, 40), one(a, 40), one(b, 70),
                                    one(b, 70), chat)

    *lengths, chat = asyncio.run(run())
    assert lengths == [40, 40, 40, 70, 70]
    assert chat.choices[0].message.content == SCRIPT_TEXT
    wait_idle(cluster.frontends[0].base_url)


def test_custom_frontend_example(cluster):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_frontend.py"),
                          "--engine", cluster.address, "--prompt-ids",
                          *map(str, cluster.prompt), "--max-tokens", "50"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    streamed = [int(t) for line in out.stdout.splitlines() if line.startswith("tokens:")
                for t in line.split()[1:]]
    assert streamed == [*cluster.chain, 2] and "finished: stop" in out.stdout


def test_engine_queue_full_is_429(cluster):
    async def run():
        client = _client(cluster.frontends[0])
        calls = [client.completions.create(model=cluster.model, prompt=[5, 6, 7 + i],
                                           max_tokens=500, extra_body={"ignore_eos": True})
                 for i in range(16)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, Exception)]
    # At most 4 run and 8 wait while the first ones generate their 500 tokens.
    assert len(refused) >= 4 and served and len(refused) + len(served) == 16
    assert all(r.status_code == 429 for r in refused)
    wait_idle(cluster.frontends[0].base_url)


def test_frontend_inflight_bound_is_429(cluster):
    client = openai.OpenAI(base_url=cluster.frontends[1].base_url + "/v1", api_key="x",
                           max_retries=0)
    # More sequences than may ever be in flight: a 400, since retrying cannot help.
    with pytest.raises(openai.BadRequestError, match="max-inflight-requests"):
        client.completions.create(model=cluster.model, prompt="x", n=5, max_tokens=2)
    stream = client.completions.create(model=cluster.model, prompt="x", n=4, max_tokens=2000,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))  # 4 in flight: one more must wait
    with pytest.raises(openai.RateLimitError, match="max-inflight-requests"):
        client.completions.create(model=cluster.model, prompt="x", max_tokens=2)
    stream.close()
    wait_idle(cluster.frontends[1].base_url)
    assert client.completions.create(model=cluster.model, prompt="x", n=4, max_tokens=2)


def test_frontend_stops_on_sigterm_others_keep_serving(cluster):
    a, b = cluster.frontends
    assert b.stop(signal.SIGTERM) == 0
    out = openai.OpenAI(base_url=a.base_url + "/v1", api_key="x", max_retries=0
                        ).completions.create(model=cluster.model, prompt="x", max_tokens=3)
    assert out.usage.completion_tokens == 3


def test_engine_killed_frontend_answers_503_and_exits(cluster):
    frontends = [fe for fe in cluster.frontends if fe.proc.poll() is None]
    # `zomni engine` runs the engine core as its child: kill the core itself.
    core = next(p for p in psutil.Process(cluster.engine.proc.pid).children()
                if "zomni.core.engine" in " ".join(p.cmdline()))
    async def run():
        tasks = [asyncio.create_task(_client(fe).completions.create(
                    model=cluster.model, prompt=[5, 6, 7], max_tokens=3000,
                    extra_body={"ignore_eos": True}))
                 for fe in frontends for _ in range(3)]
        await asyncio.sleep(1.0)
        core.send_signal(signal.SIGKILL)
        return await asyncio.gather(*tasks, return_exceptions=True)

    for result in asyncio.run(run()):
        assert isinstance(result, openai.APIStatusError) and result.status_code == 503, result
    for fe in frontends:
        assert http("GET", fe.base_url + "/health")[0] in (503, 0)
        assert fe.proc.wait(30) == 1, fe.output()
        assert "engine is gone" in fe.output()
    assert cluster.engine.proc.wait(30) == 128 + signal.SIGKILL
