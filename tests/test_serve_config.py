"""The Serve app's deployment: its options from the config tree, the Serve config file kept in configs/serve/
(valid for `serve run` / `serve deploy`, and what `veason serve --write-serve-config` writes today), and the
app it builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serve.app import app_builder, deployment_options
from veason_ray.config import ServeDeploymentConfig
from veason_ray.config_loading import ConfigError

REPO = Path(__file__).resolve().parents[1]
KEPT = REPO / "configs" / "serve" / "veason-3b-1gpu.yaml"


def test_deployment_options_fixed_and_autoscaled():
    fixed = deployment_options(ServeDeploymentConfig(replicas=3, num_gpus=0.5, max_ongoing_requests=7))
    assert fixed == {
        "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0.5},
        "max_ongoing_requests": 7,
        "max_constructor_retry_count": 3,
        "num_replicas": 3,
    }
    scaled = deployment_options(
        ServeDeploymentConfig(autoscale=True, min_replicas=1, max_replicas=4, target_ongoing_requests=2),
        env={"VEASON_API_KEY": "k"},
    )
    assert "num_replicas" not in scaled and scaled["ray_actor_options"]["runtime_env"] == {
        "env_vars": {"VEASON_API_KEY": "k"}
    }
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 2,
    }
    with pytest.raises(ConfigError, match="min_replicas"):
        deployment_options(ServeDeploymentConfig(autoscale=True, min_replicas=3, max_replicas=2))


def test_the_kept_serve_config_file_is_current_and_valid(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    written = tmp_path / "serve.yaml"
    command = [sys.executable, "-m", "pipelines.cli", "serve", "configs/serve-3b-1gpu.yaml",
               "--write-serve-config", str(written)]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=120)
    assert written.read_text() == KEPT.read_text(), "regenerate it: veason serve ... --write-serve-config"
    document = yaml.safe_load(KEPT.read_text())
    schema = ServeDeploySchema.model_validate(document)
    (application,) = schema.applications
    assert application.import_path == "serve.app:app_builder"
    assert (REPO / application.args["config"]).is_file()


def test_the_builder_makes_the_three_deployments_with_their_gpu_shares(monkeypatch):
    monkeypatch.chdir(REPO)
    document = yaml.safe_load(KEPT.read_text())
    app = app_builder(document["applications"][0]["args"])
    ingress = app._bound_deployment
    assert ingress.name == "ingress"
    policy, masks = ingress.init_args[1:]
    assert policy._bound_deployment.ray_actor_options["num_gpus"] == 0.6
    assert masks._bound_deployment.ray_actor_options["num_gpus"] == 0.15
    assert masks._bound_deployment._deployment_config.num_replicas == 2  # one prepares while the other tracks
    with pytest.raises(ConfigError, match="overrides"):
        app_builder({"config": "configs/serve-3b-1gpu.yaml", "overrides": "serve.port=1"})


def test_serve_refuses_a_missing_local_model_before_starting(tmp_path):
    command = [sys.executable, "-m", "pipelines.cli", "serve", "tests/configs/small.yaml",
               f"model.policy={tmp_path}/nothing", "reward.propagator=colour"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert (
        f"veason serve: cannot start:\n  model.policy={tmp_path}/nothing: no such folder; `make demo`"
        in done.stderr
    )
    assert "reward.sam2.checkpoint" not in done.stderr  # the colour tracker loads no model
