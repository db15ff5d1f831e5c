"""`veason serve CONFIG [key=value ...]`: the trained model behind an HTTP endpoint (Ray Serve, serve/).

Starts the app on local Ray, or on the cluster of `RAY_ADDRESS` / `placement.ray_address`, at
`serve.host`:`serve.port` under `serve.route_prefix`, and runs until interrupted (the app keeps running on a
cluster it was deployed to only while this driver lives; `serve deploy` with a config file is for that).

    veason serve configs/qwen2.5vl-3b-1gpu.yaml model.policy=s3://bucket/run/export
    veason serve CONFIG --write-serve-config configs/serve-3b.yaml   # a Serve config file, then exit

The page is at `/`, the API under `/v1/` (schema: `/openapi.json`, reference: `/docs`). With the variable
named by `serve.api_key_env` (VEASON_API_KEY) set, every request but liveness needs `Authorization: Bearer`.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

import yaml

from pipelines import preflight
from pipelines.config_command import add_config_arguments, config_from_args
from pipelines.console import open_console, say
from veason_ray.config import VeasonConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--write-serve-config",
        metavar="PATH",
        help="write a Serve config file (`serve deploy` / `serve run` format) for CONFIG and overrides, then exit",
    )


SERVE_CONFIG_HEADER = """\
# A Serve config file for veason-ray, written by `veason serve CONFIG --write-serve-config PATH`:
#   serve run PATH  (local)  |  serve deploy PATH  (a running cluster; the code must be on its nodes)
# The app and its deployments (replicas, GPUs, batching) come from CONFIG and the overrides below (serve.* keys).
# To require an API key, give the app `runtime_env: {env_vars: {VEASON_API_KEY: ...}}` or set it on the nodes.
"""


def serve_config_document(cfg: VeasonConfig, config_path: str | None, overrides: list[str]) -> dict:
    """A Serve config file for this app: `serve run FILE` or `serve deploy FILE` builds the same app as
    `veason serve` (deployment options come from the `serve.*` keys through `app_builder`)."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
        "applications": [
            {
                "name": cfg.serve.app_name,
                "route_prefix": cfg.serve.route_prefix,
                "import_path": "serve.app:app_builder",
                "args": {"config": config_path, "overrides": list(overrides)},
            }
        ],
    }


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "serve")
    open_console(cfg, "serve")
    if not args.write_serve_config:  # the models are checked before Serve starts its replicas
        policy = preflight.model_problems("model.policy", cfg.model.policy, cfg.storage)
        preflight.check("serve", [*policy, *preflight.sam2_problems(cfg)])
    config_path = args.config if args.config and "=" not in args.config else None
    overrides = [o for o in ([args.config] if args.config and "=" in args.config else []) + args.overrides]
    if args.write_serve_config:
        path = Path(args.write_serve_config)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = SERVE_CONFIG_HEADER
        path.write_text(
            header + yaml.safe_dump(serve_config_document(cfg, config_path, overrides), sort_keys=False)
        )
        say(f"wrote {path}: serve run {path}  (or serve deploy {path} on a cluster)")
        return 0

    from ray import serve

    from pipelines.ray_runtime import init_ray
    from serve.app import build_app

    init_ray(cfg.placement)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    say(f"veason serve: starting {cfg.serve.app_name} (model {cfg.model.policy}); loading the models ...")
    serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix)
    prefix = cfg.serve.route_prefix.rstrip("/")
    say(f"veason serve: ready at http://{cfg.serve.host}:{cfg.serve.port}{prefix}/ (API docs: {prefix}/docs)")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    say("veason serve: shutting down")
    serve.shutdown()
    return 0
