"""The `zomni` command: start all processes, or any one of them on its own.

    zomni serve    [--model PATH ...] [engine flags] [frontend flags]   engines + workers + HTTP
    zomni engine   [--model PATH] --listen tcp://127.0.0.1:5555 [engine flags]
    zomni frontend --engine tcp://127.0.0.1:5555 [--engine ADDRESS ...] [frontend flags]
    zomni keys     generate DIR [--client NAME]          CURVE keys (proto/keys.py)
    zomni --version

`serve` starts one engine per `--model` (an LLM and an image model side by side, say) and one
frontend that routes each request by its `model`; LLM-only flags then apply to the LLMs only.

Engine flags are generated from `EngineConfig`'s fields (`max_num_seqs` → `--max-num-seqs`), so
a new field gets its flag for free. Flags left out fall back to `ZOMNI_<FIELD>` environment
variables, then to the defaults.

On SIGINT / SIGTERM, `serve` and `frontend` drain: new requests get 503, those in flight get
`--drain-timeout-s` to finish, the rest end with an error (a stream: an error event, then
`data: [DONE]`); then every engine this command started stops, and the command exits 0.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import signal
import sys
import types
import typing

import msgspec

from zomni._process import new_ipc_address
from zomni.proto import EngineConfig, InvalidRequest, ModelKind, ZomniError, keys
from zomni.proto.config import refused_fields
from zomni.proto.model_info import model_kind

from . import server
from .launch import EngineProcess, make_config, resolve_model

logger = logging.getLogger("zomni")

_ENGINE_HELP = {
    "tensor_parallel_size": "worker processes (one per device) sharing every layer",
    "dtype": "auto | float32 | bfloat16 | float16",
    "device": "auto | cpu | cuda",
    "max_model_len": "context length to serve (default: the model's)",
    "block_size": "tokens per KV-cache block (default: 64 on a CPU, 16 on a GPU)",
    "kv_cache_memory_gb": "KV-cache memory per worker, in GiB",
    "num_kv_blocks": "KV-cache blocks per worker (overrides --kv-cache-memory-gb)",
    "max_num_seqs": "most requests running at once (image models: most images in one batch)",
    "max_num_batched_tokens": "token budget of one engine step (default: 192 on a CPU, "
                              "2048 on a GPU; 1024 / 8192 with --no-online)",
    "max_waiting_requests": "bound of the engine's waiting queue; beyond it: HTTP 429",
    "enable_prefix_caching": "reuse the KV cache of shared prompt prefixes",
    "async_scheduling": "plan the next step while the workers run this one (default: on for "
                        "LLMs, off for image models)",
    "online": "pick defaults for requests arriving over time (on for serve and engine)",
    "seed": "engine-wide sampling seed",
    "num_threads": "torch threads per worker (default: all cores)",
    "step_timeout_s": "seconds an engine step may take before its workers count as hung: the "
                      "engine then fails every request (HTTP 503) and exits (default: 300)",
    "drain_timeout_s": "on SIGTERM / SIGINT, seconds requests in flight get to finish (new "
                       "ones get 503) before the rest end with an error (default: 5); `serve`: "
                       "its frontend's drain too",
    "curve_keys_dir": "turn on CURVE for the engine's clients: DIR from `zomni keys generate "
                      "DIR` (DIR/server.key_secret; with DIR/clients/*.key, only those clients "
                      "may connect); `serve`: its frontend connects with DIR's keys "
                      "(default: off)",
    "step_cache": "image models: the step cache of requests without a `cache`, as JSON, e.g. "
                  "'{\"type\": \"fbcache\", \"threshold\": 0.08}' or type teacache, option "
                  "max_consecutive_skips (default: off)",
}


def _flag_type(annotation) -> type:
    """`int | None` → int: the type argparse converts a flag's value with."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _add_engine_flags(parser: argparse.ArgumentParser, listen_default: str | None) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("model_tag", nargs="?", metavar="MODEL",
                       help="model directory (same as --model)")
    group.add_argument("--model", action="append", help="HF-format model directory (an LLM, "
                       "or a LLaDA / Dream masked-diffusion LM), diffusers pipeline folder "
                       "or a bundled model's name (zomni-demo, the default; "
                       "zomni-demo-image, zomni-demo-dllm); `serve` takes it more than once, "
                       "one engine each")
    group.add_argument("--listen", help="the engine's client address (ipc:// or tcp://); "
                       f"default {listen_default or 'a private ipc:// path'}")
    parser.set_defaults(default_listen=listen_default)
    hints = typing.get_type_hints(EngineConfig)
    for field in msgspec.structs.fields(EngineConfig):
        if field.name in ("model", "listen"):
            continue
        flags = _FLAG_NAMES.get(field.name, ("--" + field.name.replace("_", "-"),))
        kind = _flag_type(hints[field.name])
        help_ = _ENGINE_HELP.get(field.name, field.name)
        if kind is bool:
            group.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_)
        else:
            if "default" not in help_:
                help_ += f" (default: {field.default})"
            group.add_argument(*flags, dest=field.name, type=kind, default=None, help=help_,
                               metavar="DIR" if field.name.endswith("_dir") else None)


# flags named otherwise than their field (the field's own name stays as an alias)
_FLAG_NAMES = {"curve_keys_dir": ("--curve-keys", "--curve-keys-dir")}
_CURVE_KEYS_HELP = ("the engines' CURVE keys, laid out as `zomni keys generate` makes them: "
                    "DIR/server.key (the engine's public key) and this frontend's key pair "
                    "DIR/clients/NAME.key_secret (none: a fresh one)")


def _add_link_flags(parser: argparse.ArgumentParser, standalone: bool) -> None:
    """How a frontend reaches its engines. `serve` shares --curve-keys and --drain-timeout-s
    with the engines it starts (engine flags); `frontend` has them on its own."""
    group = parser.add_argument_group("frontend to engine")
    if standalone:
        group.add_argument("--curve-keys", "--curve-keys-dir", dest="curve_keys_dir",
                           metavar="DIR", help=_CURVE_KEYS_HELP)
        group.add_argument("--drain-timeout-s", type=float, help="on SIGTERM / SIGINT, "
                           "seconds requests in flight get to finish (new ones get 503) "
                           "before the rest end with an error (default 5)")
    group.add_argument("--curve-client", metavar="NAME", help="the key pair "
                       "DIR/clients/NAME.key_secret of --curve-keys DIR to connect with "
                       "(default: the only one there)")


def _add_frontend_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("HTTP frontend")
    group.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    group.add_argument("--port", type=int, help="port to listen on (default 8000)")
    group.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every "
                       "route but /health, / (the playground page) and /metrics (or set "
                       "ZOMNI_API_KEY)")
    group.add_argument("--metrics-require-api-key", action="store_true", default=None,
                       help="with --api-key, guard /metrics too (by default it stays open "
                       "to Prometheus scrapers, as in vLLM)")
    group.add_argument("--max-request-body-mb", type=float, help="largest request body, "
                       "inflated size of a gzip / deflate body included; beyond: 413 "
                       "(default 8)")
    group.add_argument("--header-timeout-s", type=float, help="seconds a connection may "
                       "take to send a request's headers, counted from its opening or the "
                       "last response; also how long an idle keep-alive connection stays "
                       "open (default 15)")
    group.add_argument("--body-timeout-s", type=float, help="seconds a request's body may "
                       "take to arrive; beyond: 408 and the connection closes (default 30)")
    group.add_argument("--rate-limit-rps", type=float, help="requests per second per API "
                       "key (per client IP without --api-key); beyond: 429 with Retry-After "
                       "(default 0: no limit)")
    group.add_argument("--rate-limit-tokens-per-s", type=float, help="prompt + generated "
                       "tokens per second per API key (per client IP without --api-key), "
                       "charged as computed; an overdrawn client gets 429 with Retry-After "
                       "(default 0: no limit)")
    group.add_argument("--served-model-name", action="append", help="the model's name in the "
                       "API (default: its path); once per engine, in the same order")
    group.add_argument("--tokenizer", action="append", help="an LLM's tokenizer directory "
                       "(default: the engine's model); per engine, in the same order")
    group.add_argument("--max-inflight-requests", type=int,
                       help="requests in flight per engine of this frontend; beyond: 429 "
                       "(default 1024)")
    group.add_argument("--engine-ready-timeout", type=float,
                       help="seconds to wait for the engine to be ready (default 600)")
    group.add_argument("--access-log", action="store_true", default=None,
                       help="log every HTTP request")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zomni", description="Serve LLMs and image models "
                                     "over HTTP.")
    parser.add_argument("--version", action="version", version=f"zomni {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="engine core, workers and an HTTP frontend")
    _add_engine_flags(serve, listen_default=None)
    _add_frontend_flags(serve)
    _add_link_flags(serve, standalone=False)
    engine = sub.add_parser("engine", help="engine core and workers only")
    _add_engine_flags(engine, listen_default=server.DEFAULT_ENGINE_ADDRESS)
    frontend = sub.add_parser("frontend", help="an HTTP frontend for a running engine")
    frontend.add_argument("--engine", action="append", help="an engine's address (default "
                          f"{server.DEFAULT_ENGINE_ADDRESS}); repeat it to serve several "
                          "engines' models from one frontend (ZOMNI_ENGINE: comma-separated)")
    _add_frontend_flags(frontend)
    _add_link_flags(frontend, standalone=True)
    # Parsed by proto/keys.py itself (see main); listed here for `zomni --help`.
    sub.add_parser("keys", add_help=False, help="make CURVE keys for the engine's client "
                   "socket: zomni keys generate DIR [--client NAME]")
    return parser


def package_version() -> str:
    try:
        return importlib.metadata.version("zomni")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _models(args: argparse.Namespace) -> list[str | None]:
    models = [*([args.model_tag] if args.model_tag else []), *(args.model or [])]
    # a shipped model's name (zomni-demo, zomni-demo-image) -> its folder
    return [resolve_model(m) for m in models] or [None]  # None: ZOMNI_MODEL, else the demo


def _engine_configs(args: argparse.Namespace) -> list[EngineConfig]:
    """One engine config per model. With several models, a flag goes to the models that take
    it (an image model refuses LLM flags, a masked-diffusion LM the autoregressive-only ones);
    given to no model that takes it, it is refused as usual."""
    overrides = {f: getattr(args, f) for f in EngineConfig.__struct_fields__
                 if f not in ("model", "listen")}
    models = _models(args)
    if len(models) > 1 and (args.listen or os.environ.get("ZOMNI_LISTEN")):
        raise InvalidRequest("--listen (ZOMNI_LISTEN) names one engine's address; leave it "
                             "out to serve several models", param="listen")
    kinds = [model_kind(m) if m else ModelKind.AR for m in models]
    configs = []
    for model, kind in zip(models, kinds):
        # a flag some other model takes is not given to a model that refuses it
        mine = {f: v for f, v in overrides.items() if f not in refused_fields(kind)
                or not any(f not in refused_fields(k) for k in kinds)}
        cfg = make_config(model, online_default=True, listen=args.listen, **mine)
        if not cfg.listen and args.default_listen:  # neither --listen nor ZOMNI_LISTEN
            cfg.listen = args.default_listen
        configs.append(cfg)
    return configs


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    """The config of the one engine `zomni engine` starts."""
    configs = _engine_configs(args)
    if len(configs) > 1:
        raise InvalidRequest("`zomni engine` serves one model; start one engine per model, or "
                             "use `zomni serve` with several --model", param="model")
    return configs[0]


def _frontend_config(args: argparse.Namespace,
                     engines: list[str] | None) -> server.FrontendConfig:
    names = ("host", "port", "api_key", "served_model_name", "tokenizer",
             "max_inflight_requests", "engine_ready_timeout", "access_log",
             "drain_timeout_s", "curve_keys_dir", "curve_client", "metrics_require_api_key",
             "max_request_body_mb", "header_timeout_s", "body_timeout_s", "rate_limit_rps",
             "rate_limit_tokens_per_s")
    return server.FrontendConfig.from_env(engine=engines,
                                          **{n: getattr(args, n) for n in names})


def _log_config(what: str, cfg: msgspec.Struct) -> None:
    shown = msgspec.structs.asdict(cfg)
    if shown.get("api_key"):
        shown["api_key"] = "***"  # never print secrets
    logger.info("%s config: %s", what, shown)


def _serve(args: argparse.Namespace) -> int:
    configs = _engine_configs(args)
    for cfg in configs:  # addresses first: the frontend config is checked before any start
        cfg.listen = cfg.listen or new_ipc_address("engine")
    frontend_cfg = _frontend_config(args, [cfg.listen for cfg in configs])
    if frontend_cfg.curve_keys_dir:  # the frontend's key files, checked before any start
        keys.keys_from_dir(frontend_cfg.curve_keys_dir, frontend_cfg.curve_client)
    processes: list[EngineProcess] = []
    try:
        for cfg in configs:
            processes.append(EngineProcess(cfg))
        _log_config("frontend", frontend_cfg)
        return server.run(frontend_cfg, processes)
    finally:
        for process in processes:  # all stop at once, then each is waited for
            if process.alive():
                process.proc.send_signal(signal.SIGTERM)
        for process in processes:
            process.shutdown()


def _frontend(args: argparse.Namespace) -> int:
    cfg = _frontend_config(args, engines=args.engine)
    _log_config("frontend", cfg)
    return server.run(cfg)


def _engine(args: argparse.Namespace) -> int:
    # A child process, not `core.engine.main` here: the engine dies with its parent (no
    # orphans), and for `zomni engine` that parent must be this command, not the shell that
    # started it (`zomni engine ... &` from a script that then exits would kill it).
    process = EngineProcess(_engine_config(args))

    def stop(signum: int, _frame) -> None:
        process.proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = process.proc.wait()
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:  # a torch-free command with its own parser
        sys.exit(keys.main(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("ZOMNI_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = {"serve": _serve, "engine": _engine, "frontend": _frontend}[args.command]
    try:
        code = run(args)
    except (ZomniError, msgspec.ValidationError, ValueError) as e:
        parser.exit(2, f"zomni {args.command}: error: {e}\n")
    except OSError as e:  # e.g. the port is taken
        parser.exit(1, f"zomni {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
