"""`veason config`: print the resolved configuration tree as YAML (credentials redacted)."""

from __future__ import annotations

import argparse

import yaml

from veason_ray.config import VeasonConfig
from veason_ray.config_loading import ConfigError, config_to_dict, load_config


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """The positional CONFIG (a YAML file) and `key=value` overrides every program takes."""
    where = f" (default: {default})" if default else " (optional)"
    parser.add_argument("config", nargs="?", default=default, help=f"a YAML file under configs/{where}")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.n=8 learner.lr=1e-6")
    parser.set_defaults(_config_default=default)


def config_from_args(args: argparse.Namespace, program: str) -> VeasonConfig:
    """The resolved config; a first positional containing '=' is an override (`veason X a.b=1` names no
    file, and then the subcommand's default file, if any, is used). Errors exit with the key's name."""
    overrides = list(args.overrides)
    config = args.config
    if config is not None and "=" in config:
        overrides.insert(0, config)
        config = getattr(args, "_config_default", None)
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        raise SystemExit(f"veason {program}: {exc}") from None
    if getattr(args, "verbose", False):  # `veason --verbose`
        cfg.run.verbose = True
    from pipelines.job_paths import check_job_paths

    check_job_paths(cfg, program)
    return cfg


add_arguments = add_config_arguments


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "config")
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0
