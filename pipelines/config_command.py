"""`veason config`: print the resolved configuration tree as YAML (credentials redacted)."""

from __future__ import annotations

import argparse

import yaml

from veason_ray.config_loading import ConfigError, config_to_dict, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="a YAML file under configs/ (optional)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.n=8 learner.lr=1e-6")


def split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`veason X a.b=1` has no config file: a first positional containing '=' is an override."""
    overrides = list(args.overrides)
    config = args.config
    if config is not None and "=" in config:
        overrides.insert(0, config)
        config = None
    return config, overrides


def run(args: argparse.Namespace) -> int:
    config, overrides = split_config_and_overrides(args)
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        raise SystemExit(f"veason config: {exc}") from None
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0
