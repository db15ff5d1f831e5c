"""The Serve application: the ingress (HTTP) bound to the policy and mask deployments, each with its own
replicas (fixed or autoscaled), resources, `max_ongoing_requests` and batching (`serve.ingress`,
`serve.policy`, `serve.masks`).

    build_app(cfg)         the application for `serve.run` (`veason serve`)
    app_builder(args)      the same for Serve config files (`serve deploy` / `serve run`):
                           import_path: serve.app:app_builder, args: {config: <yaml>, overrides: [k=v, ...]}
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application

from serve.ingress import SegmentationAPI
from serve.mask_deployment import MaskDeployment
from serve.policy_deployment import PolicyDeployment
from veason_ray.config import ServeReplicasConfig, VeasonConfig
from veason_ray.config_loading import ConfigError, load_config

CONSTRUCTOR_RETRIES = 3  # a replica whose model cannot load is retried this often, then the deploy fails


def deployment_options(settings: ServeReplicasConfig, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Serve deployment options of one deployment's config."""
    actor: dict[str, Any] = {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus}
    if env:
        actor["runtime_env"] = {"env_vars": env}
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
    }
    if settings.autoscale:
        if not 0 < settings.min_replicas <= settings.max_replicas:
            raise ConfigError(
                f"serve autoscaling: min_replicas {settings.min_replicas} and max_replicas "
                f"{settings.max_replicas} must satisfy 0 < min_replicas <= max_replicas"
            )
        options["autoscaling_config"] = {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = settings.replicas
    return options


def build_app(cfg: VeasonConfig) -> Application:
    """The application: ingress -> (policy, masks). The API key, when the environment variable named by
    `serve.api_key_env` is set here, travels to the ingress replicas in their runtime environment."""
    serve_cfg = cfg.serve
    key_env = serve_cfg.api_key_env
    ingress_env = {key_env: os.environ[key_env]} if key_env and os.environ.get(key_env) else None
    policy = PolicyDeployment.options(**deployment_options(serve_cfg.policy)).bind(cfg)
    masks = MaskDeployment.options(**deployment_options(serve_cfg.masks)).bind(cfg)
    ingress = SegmentationAPI.options(**deployment_options(serve_cfg.ingress, ingress_env))
    return ingress.bind(cfg, policy, masks)


def app_builder(args: dict[str, Any]) -> Application:
    """For Serve config files: `args.config` (a YAML of ours, relative to the working directory) and
    `args.overrides` (a list of "key=value")."""
    overrides = args.get("overrides") or []
    if not isinstance(overrides, list):
        raise ConfigError("serve config args.overrides: expected a list of 'key=value' strings")
    return build_app(load_config(args.get("config") or None, [str(o) for o in overrides]))
