"""Load, override, validate and save the configuration tree of `config.py`.

Order of precedence: dataclass defaults < YAML file (and the `_base_` files it extends, nearest last) <
dotted command-line overrides (`learner.lr=1e-6`, `data.expression_types=[0,1]`). Values of overrides are
parsed as YAML scalars/lists. Unknown keys and wrong types raise `ConfigError` naming the dotted key, what
was expected and, for unknown keys, the closest valid names.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from veason_ray.config import (
    VLLM_MAX_ALLOWED_TOKEN_IDS,
    VLLM_MAX_STOP_TOKEN_IDS_WITH_MIN_TOKENS,
    SamplingConfig,
    VeasonConfig,
)

BASE_KEY = "_base_"
# (section, field) pairs that hold credentials; never written or printed in the clear.
SECRET_FIELDS = (
    ("storage", "access_key_id"),
    ("storage", "secret_access_key"),
    ("storage", "session_token"),
    ("cot", "api_key"),
)


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and the fix."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> VeasonConfig:
    """Defaults, then the YAML at `path` (if any), then `overrides` ("a.b=value" each)."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml_with_bases(Path(path), seen=())
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    cfg = build_dataclass(VeasonConfig, raw, prefix="")
    check_relations(cfg)
    return cfg


def check_sampling(sampling: SamplingConfig) -> None:
    """rollout.sampling against what vLLM's GPU model runner takes per request (config.py says the limits)."""
    stops = len(sampling.stop_token_ids)
    if sampling.min_new_tokens > 0 and stops > VLLM_MAX_STOP_TOKEN_IDS_WITH_MIN_TOKENS:
        raise ConfigError(
            f"rollout.sampling.stop_token_ids has {stops} ids with rollout.sampling.min_new_tokens="
            f"{sampling.min_new_tokens}: vLLM's GPU model runner holds at most "
            f"{VLLM_MAX_STOP_TOKEN_IDS_WITH_MIN_TOKENS} stop ids when a minimum length is set; give fewer ids "
            "(rollout.sampling.allowed_token_ids narrows what is sampled, so few ids can stop often) or set "
            "min_new_tokens=0"
        )
    allowed = len(sampling.allowed_token_ids)
    if allowed > VLLM_MAX_ALLOWED_TOKEN_IDS:
        raise ConfigError(
            f"rollout.sampling.allowed_token_ids has {allowed} ids: vLLM's GPU model runner holds at most "
            f"{VLLM_MAX_ALLOWED_TOKEN_IDS}; give fewer or none (empty = the whole vocabulary)"
        )
    if (
        allowed
        and sampling.stop_token_ids
        and not set(sampling.stop_token_ids) <= set(sampling.allowed_token_ids)
    ):
        raise ConfigError(
            "rollout.sampling.stop_token_ids must be among rollout.sampling.allowed_token_ids (the others are "
            "never sampled, so they would never stop a response)"
        )


def check_sampling_vocabulary(sampling: SamplingConfig, tokenizer_size: int, model_vocab_size: int) -> None:
    """rollout.sampling's token ids against the policy's tokenizer and model (an engine checks this before vLLM
    starts): vLLM 0.26 rejects allowed ids at or above the tokenizer's length, later versions at or above the
    model's vocabulary, and either way only when the first request comes."""
    bound = min(tokenizer_size, model_vocab_size)
    for key in ("allowed_token_ids", "stop_token_ids"):
        outside = sorted(i for i in getattr(sampling, key) if not 0 <= i < bound)
        if outside:
            raise ConfigError(
                f"rollout.sampling.{key} holds {len(outside)} id(s) outside this policy's vocabulary "
                f"(tokenizer {tokenizer_size} tokens, model {model_vocab_size}), e.g. {outside[:5]}: give ids "
                f"below {bound}"
            )


def check_relations(cfg: VeasonConfig) -> None:
    """Values that are each in range but cannot go together (ranges are checked field by field on loading), and
    reward.weights' names against the registered reward terms."""
    from veason_ray.rewards import reward_weights

    try:
        reward_weights(cfg.reward.weights)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_sampling(cfg.rollout.sampling)
    synth = cfg.data.synth
    if synth.min_objects > synth.max_objects:
        raise ConfigError(
            f"data.synth.min_objects={synth.min_objects} > data.synth.max_objects={synth.max_objects}: "
            "lower the first or raise the second"
        )
    for name in ("ingress", "policy", "masks"):
        replicas = getattr(cfg.serve, name)
        if replicas.autoscale and replicas.min_replicas > replicas.max_replicas:
            raise ConfigError(
                f"serve.{name}.min_replicas={replicas.min_replicas} > serve.{name}.max_replicas="
                f"{replicas.max_replicas}: autoscaling needs min <= max"
            )


def parse_override(item: str) -> tuple[str, Any]:
    """`"rollout.n=8"` -> `("rollout.n", 8)`; the value is read as YAML (so `[0,1]`, `true`, `1e-6` work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. rollout.n=8")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: the key {key!r} is not a dotted name such as learner.lr")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
    return key, value


def config_to_dict(cfg: Any, redact_secrets: bool = True) -> dict[str, Any]:
    """The tree as plain data; credentials are replaced by '***' unless `redact_secrets` is False."""
    data = dataclasses.asdict(cfg)
    if redact_secrets:
        for section, name in SECRET_FIELDS:
            if data.get(section, {}).get(name):
                data[section][name] = "***"
    return data


def save_config(cfg: VeasonConfig, path: str | Path) -> Path:
    """Write the resolved configuration (credentials redacted) as YAML, e.g. next to a run's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def _read_yaml_with_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: {BASE_KEY} files form a cycle: {' -> '.join(map(str, seen + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (pass a YAML file such as configs/demo.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict[str, Any] = {}
    for base in bases:
        _deep_merge(merged, _read_yaml_with_bases(path.parent / base, seen + (path,)))
    _deep_merge(merged, data)
    return merged


def _deep_merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    """Build `cls` from a mapping, checking every key and type; `prefix` is the dotted path for messages."""
    where = prefix or "the top level"
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {_describe(raw)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=3)
        hint = f"; did you mean {', '.join(_join(prefix, c) for c in close)}?" if close else ""
        raise ConfigError(
            f"unknown config key {_join(prefix, str(key))!r}{hint} (valid keys under {where}: {', '.join(fields)})"
        )
    values = {name: _coerce(hints[name], raw[name], _join(prefix, name)) for name in raw}
    for name, value in values.items():
        bounds = fields[name].metadata.get("bounds")
        if bounds is not None and not bounds.admits(value):
            raise ConfigError(f"{_join(prefix, name)}={value!r}: must be {bounds}")
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise _type_error(key, tp, value)
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        choices = ", ".join(repr(a) for a in get_args(tp))
        raise ConfigError(f"config key {key!r}: expected one of {choices}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        (item_tp,) = get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(key, tp, value)
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(key, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-6` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric-looking run name given on the command line
        raise _type_error(key, tp, value)
    raise ConfigError(f"config key {key!r}: unsupported field type {tp!r} (a bug in config.py)")


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {_describe(value)}")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


__all__ = [
    "ConfigError",
    "build_dataclass",
    "config_to_dict",
    "load_config",
    "parse_override",
    "save_config",
]
