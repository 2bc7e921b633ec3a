"""The `zomni` command and the scripts/ launchers: flags, errors, clean stops."""

from __future__ import annotations

import importlib.metadata
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from http_utils import Proc, scripted_model, zomni_cmd

from zomni._process import free_port
from zomni.frontend import cli
from zomni.frontend.launch import make_config
from zomni.proto import InvalidRequest
from zomni.proto.keys import generate, keys_from_dir
from zomni.workers.device import default_block_size, default_max_num_batched_tokens

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command_and_engine_flag():
    out = subprocess.run(zomni_cmd("--help"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and all(c in out.stdout for c in ("serve", "engine", "frontend"))
    out = subprocess.run(zomni_cmd("serve", "--help"), capture_output=True, text=True,
                         timeout=60)
    for flag in ("--tensor-parallel-size", "--max-model-len", "--dtype", "--num-kv-blocks",
                 "--kv-cache-memory-gb", "--max-num-seqs", "--max-num-batched-tokens",
                 "--api-key", "--host", "--port", "--no-enable-prefix-caching"):
        assert flag in out.stdout


def test_servers_default_to_online_and_budgets_follow_device_and_use(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.delenv("ZOMNI_ONLINE", raising=False)
    parser = cli.build_parser()
    for command in ("serve", "engine"):
        assert cli._engine_config(parser.parse_args([command, str(tmp_path)])).online
        assert not cli._engine_config(parser.parse_args([command, str(tmp_path),
                                                         "--no-online"])).online
    assert not make_config(str(tmp_path)).online  # LLM
    monkeypatch.setenv("ZOMNI_ONLINE", "0")
    assert not cli._engine_config(parser.parse_args(["serve", str(tmp_path)])).online
    assert [default_max_num_batched_tokens(device, online) for device, online in
            [("cpu", True), ("cpu", False), ("cuda", True), ("cuda", False)]] == [
        192, 1024, 2048, 8192]
    assert [default_block_size(device) for device in ("cpu", "cuda")] == [64, 16]


def test_bad_model_is_a_clear_error(tmp_path):
    out = subprocess.run(zomni_cmd("serve", "--model", str(tmp_path / "none")),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "is neither an HF model directory" in out.stderr


def test_serve_script_stops_cleanly_on_sigint(tmp_path_factory, tmp_path):
    model, _, _ = scripted_model(tmp_path_factory)
    port = free_port()
    proc = Proc([sys.executable, str(ROOT / "scripts" / "serve.py"), str(model),
                 "--port", str(port), "--num-kv-blocks", "64", "--num-threads", "1"],
                tmp_path / "serve.log", port)
    try:
        proc.wait_healthy()
        everyone = [psutil.Process(proc.proc.pid),
                    *psutil.Process(proc.proc.pid).children(recursive=True)]
        assert len(everyone) >= 3  # frontend, engine core, worker
        assert proc.stop(signal.SIGINT) == 0, proc.output()
        gone, alive = psutil.wait_procs(everyone, timeout=30)
        assert not alive
    finally:
        proc.kill()


def test_profile_steps_script_reports_each_part(llama_dir):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_steps.py"),
                          "--model", str(llama_dir), "-n", "3", "--input-len", "20",
                          "--output-len", "5", "--max-num-batched-tokens", "32",
                          "--kv-cache-gb", "0.01"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for line in ("decode-only steps: 4 steps", "steps with prompt tokens:", "gemm", "attention",
                 "layer ops", "sampler", "rest"):
        assert line in out.stdout, out.stdout


def test_version_keys_command_and_fault_flags_have_help(capsys):
    for argv in (["--version"], ["serve", "--help"], ["frontend", "--help"], ["keys", "--help"]):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 0
    out = capsys.readouterr().out
    assert f"zomni {importlib.metadata.version('zomni')}" in out
    serve_help, frontend_help = out.split("usage: zomni serve")[1].split("usage: zomni frontend")
    for flag, words in [("--step-timeout-s", "count as hung"),
                        ("--drain-timeout-s", "seconds requests in flight get to finish"),
                        ("--curve-keys DIR", "zomni keys generate"), ("--curve-client", "")]:
        entry = serve_help.split("\n  " + flag, 1)[1][:400]  # its line under "options"
        assert words in " ".join(entry.split())
    for flag in ("--drain-timeout-s", "--curve-keys DIR", "--curve-client"):
        assert "\n  " + flag in frontend_help
    assert "usage: zomni keys" in out and "generate" in out


def test_serve_gives_its_keys_and_drain_timeout_to_engines_and_frontend(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    keys_dir = tmp_path / "keys"
    generate(keys_dir)
    generate(keys_dir, client="web")
    parser = cli.build_parser()
    args = parser.parse_args(["serve", str(tmp_path / "model"), "--curve-keys", str(keys_dir),
                              "--drain-timeout-s", "7"])
    [engine] = cli._engine_configs(args)
    frontend = cli._frontend_config(args, [engine.listen])
    assert engine.curve_keys_dir == frontend.curve_keys_dir == str(keys_dir)
    assert engine.drain_timeout_s == frontend.drain_timeout_s == 7.0
    assert keys_from_dir(frontend.curve_keys_dir) == (
        keys_dir / "server.key", keys_dir / "clients" / "web.key_secret")
    args = parser.parse_args(["frontend", "--curve-keys", str(keys_dir), "--curve-client",
                              "web", "--drain-timeout", "3"])  # a prefix is enough
    frontend = cli._frontend_config(args, None)
    assert (frontend.curve_keys_dir, frontend.curve_client, frontend.drain_timeout_s) == (
        str(keys_dir), "web", 3.0)
    generate(keys_dir, client="other")
    with pytest.raises(InvalidRequest, match="several client key pairs"):
        keys_from_dir(keys_dir)
