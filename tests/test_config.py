"""The configuration tree: defaults, YAML with _base_, dotted overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.cli import main as veason_main
from veason_ray.config import StorageConfig, VeasonConfig
from veason_ray.config_loading import ConfigError, config_to_dict, load_config, parse_override, save_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers():
    cfg = load_config()
    assert isinstance(cfg, VeasonConfig)
    assert (cfg.rollout.n, cfg.trainer.prompts_per_step) == (8, 16)
    loss = cfg.learner.loss
    assert cfg.learner.lr == 1e-6 and loss.kl_coef == 5e-3 and loss.clip_ratio == 0.2 and loss.kl_clamp == 10
    assert (
        loss.entropy_coef == 1e-3
        and loss.aggregation == "seq_mean_token_mean"
        and cfg.learner.weight_decay == 0.01
    )
    assert (cfg.data.num_frames, cfg.data.frame_size, cfg.rollout.sampling.max_new_tokens) == (6, 560, 1024)
    assert cfg.reward.weights == {"format": 1.0, "keyframe": 1.0, "spatial": 1.0, "consistency": 1.0}
    assert cfg.reward.rules == "release"


def test_overrides_parse_yaml_values_and_win_over_files(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"rollout": {"n": 4}, "learner": {"lr": 2e-6, "zero_stage": 3}}))
    child = tmp_path / "child.yaml"
    child.write_text(
        yaml.safe_dump({"_base_": "base.yaml", "rollout": {"engines": 2}, "learner": {"lr": 3e-6}})
    )
    cfg = load_config(child, ["learner.lr=1e-5", "data.expression_types=[0,1]", "run.name=42"])
    assert cfg.rollout.n == 4 and cfg.rollout.engines == 2  # from base, then child
    assert cfg.learner.zero_stage == 3
    assert cfg.learner.lr == 1e-5  # override beats both files
    assert cfg.data.expression_types == [0, 1]
    assert cfg.run.name == "42"


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["learner.lr=1"]).learner.lr == 1.0
    with pytest.raises(ConfigError, match=r"'rollout.n': expected int, got float 1.5"):
        load_config(None, ["rollout.n=1.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.nn=3", r"unknown config key 'rollout.nn'; did you mean rollout.n\?"),
        ("learner.lora.rnk=8", r"unknown config key 'learner.lora.rnk'; did you mean learner.lora.rank\?"),
        ("learner.zero_stage=5", r"'learner.zero_stage': expected one of 0, 1, 2, 3, got 5"),
        ("placement.mode=spread", r"'placement.mode': expected one of 'colocated', 'disaggregated'"),
        ("trainer.resume=maybe", r"'trainer.resume': expected bool, got str 'maybe'"),
        ("data.expression_types=[0,x]", r"'data.expression_types\[1\]': expected int, got str 'x'"),
        ("rollout=3", r"rollout: expected a mapping of RolloutConfig fields, got int 3"),
        ("rollout.n", r"expected KEY=VALUE"),
        ("rollout.n=0", r"^rollout\.n=0: must be >= 1$"),
        ("rollout.gpu_memory_utilization=1.5", r"rollout\.gpu_memory_utilization=1\.5: must be in \(0, 1\]"),
        ("learner.lr=0", r"learner\.lr=0\.0: must be > 0"),
        ("serve.port=70000", r"serve\.port=70000: must be in \[1, 65535\]"),
        ("sft.held_out_fraction=1", r"sft\.held_out_fraction=1\.0: must be in \[0, 1\)"),
        ("data.synth.min_objects=7", r"data\.synth\.min_objects=7 > data\.synth\.max_objects=6"),
        ("serve.policy.autoscale=true", None),  # min 1 <= max 1: fine
        (
            f"rollout.sampling.stop_token_ids={list(range(129))}",  # no minimum length: any number
            None,
        ),
        (
            f"rollout.sampling={{min_new_tokens: 1, stop_token_ids: {list(range(129))}}}",
            r"stop_token_ids has 129 ids with rollout\.sampling\.min_new_tokens=1: vLLM's GPU model runner "
            r"holds at most 128",
        ),
        (f"rollout.sampling.allowed_token_ids={list(range(1025))}", r"allowed_token_ids has 1025 ids"),
        (
            "rollout.sampling={allowed_token_ids: [1, 2], stop_token_ids: [3]}",
            r"stop_token_ids must be among rollout\.sampling\.allowed_token_ids",
        ),
    ],
)
def test_bad_values_name_the_key(override, message):
    if message is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_every_number_field_declares_its_bounds():
    """Each int/float key of the tree states what it accepts (field metadata), so no value goes unchecked."""
    keys = {
        key: "bounds" in f.metadata
        for key, f, hint in _config_fields(VeasonConfig)
        if hint in (int, float) and f.name != "seed"
    }
    assert len(keys) > 140 and "serve.masks.max_batch_size" in keys and "rollout.sampling.top_p" in keys
    assert [key for key, bounded in keys.items() if not bounded] == []


def test_bad_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(missing)
    cyclic = tmp_path / "a.yaml"
    cyclic.write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(cyclic)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(not_mapping)


def test_saved_config_round_trips_and_hides_credentials(tmp_path):
    cfg = load_config(
        None, ["storage.secret_access_key=hunter2", "storage.access_key_id=AKIAXX", "rollout.n=3"]
    )
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    text = path.read_text()
    assert "hunter2" not in text and "AKIAXX" not in text
    again = load_config(path)
    assert again.rollout.n == 3
    assert config_to_dict(again, redact_secrets=False)["storage"]["secret_access_key"] == "***"
    assert "hunter2" not in repr(cfg.storage)


def test_storage_falls_back_to_aws_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    resolved = StorageConfig(region="us-east-2").resolved()
    assert resolved.endpoint_url == "http://127.0.0.1:9000"
    assert resolved.region == "us-east-2"  # config wins over the environment
    assert resolved.access_key_id == "from-env"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


def test_parse_override_reads_yaml():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=") == ("a", "")
    assert parse_override("x.y=true") == ("x.y", True)


def test_config_command_prints_resolved_tree(capsys):
    assert veason_main(["config", "rollout.n=5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["rollout"]["n"] == 5
    with pytest.raises(SystemExit, match="unknown config key 'rollout.q'"):
        veason_main(["config", "rollout.q=1"])


def test_a_command_with_a_default_config_keeps_it_when_given_only_overrides(tmp_path):
    import argparse

    from pipelines.config_command import add_config_arguments, config_from_args

    default = tmp_path / "default.yaml"
    default.write_text("rollout:\n  n: 3\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, default=str(default))
    cfg = config_from_args(parser.parse_args(["learner.lr=1e-5"]), "demo")
    assert cfg.rollout.n == 3 and cfg.learner.lr == 1e-5
    cfg = config_from_args(parser.parse_args([]), "demo")
    assert cfg.rollout.n == 3
    with pytest.raises(SystemExit, match="veason demo: unknown config key 'rollout.x'"):
        config_from_args(parser.parse_args(["rollout.x=1"]), "demo")


def _config_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) of every field of the config tree under `cls`, nested sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f"{prefix}{f.name}", f, hints[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _config_fields(hints[f.name], f"{prefix}{f.name}.")


def test_every_config_field_is_read_somewhere():
    """A key nothing reads misleads whoever sets it: each field's name must appear as an attribute (`.name`)
    or a string ("name") in the code outside the config's own modules."""
    root = Path(__file__).resolve().parents[1]
    own = {root / "veason_ray" / "config.py", root / "veason_ray" / "config_loading.py"}
    source = "\n".join(
        path.read_text()
        for folder in ("veason_ray", "actors", "pipelines", "serve")
        for path in (root / folder).rglob("*.py")
        if path not in own
    )
    unread = [
        key
        for key, f, _ in _config_fields(VeasonConfig)
        if not re.search(rf"\.{f.name}\b|[\"']{f.name}[\"']", source)
    ]
    assert unread == [], f"config keys that no code reads: {unread}"
