"""The cluster launcher YAMLs (cluster/*.yaml), the GPU image (docker/) and the GPU pins (constraints/gpu.txt) agree
with Ray 2.60's own checks and with each other. Offline: Ray's validation here is the part `ray up` runs before it
asks the cloud anything (defaults from Ray's per-provider YAML, then the JSON schema and its cross-checks)."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAMLS = sorted((ROOT / "cluster").glob("*.yaml"))
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# The Python of the GPU machines where the `gpu` pins were tested (../shared/device/README.md).
DEVICE_PYTHON = "3.12"
# Lists that Ray fills from its per-provider defaults when a YAML leaves them out (its setup commands pip-install
# into the image: on Google Cloud an old google-api-python-client over the image's own).
COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")


def _raw(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _prepared(path: Path) -> dict[str, Any]:
    return prepare_config(_raw(path))


def _pins(requirements: list[str]) -> dict[str, str]:
    """Exact pins (`name==version`, extras dropped) by canonical package name."""
    pins = {}
    for line in requirements:
        req = Requirement(line)
        if any(spec.operator == "==" for spec in req.specifier):
            pins[canonicalize_name(req.name)] = str(req.specifier)
    return pins


def _constraint_lines() -> list[str]:
    text = (ROOT / "constraints" / "gpu.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _has_gpu(provider: str, node_config: dict[str, Any]) -> bool:
    if provider == "aws":
        return re.match(r"(p|g|dl|inf|trn)\d", node_config["InstanceType"]) is not None
    gpu_machine = re.match(r"(a|g)\d+-", node_config["machineType"]) is not None
    return gpu_machine or bool(node_config.get("guestAccelerators"))


def _is_spot(provider: str, node_config: dict[str, Any]) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible", False)


def _node_type_to_launch(config: dict[str, Any], demand: dict[str, int], busy: tuple[str, ...] = ()) -> str:
    """The node type Ray's autoscaler launches for one resource bundle (the head is up; `busy` types at max)."""
    types = config["available_node_types"]
    existing = {config["head_node_type"]: 1} | {name: types[name]["max_workers"] for name in busy}
    scorer = partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))
    to_add, unmet = get_nodes_for(types, existing, config["head_node_type"], 1, [demand], scorer)
    assert not unmet and len(to_add) == 1, f"no single node type for {demand}: {dict(to_add)}"
    return next(iter(to_add))


def test_there_are_cluster_yamls_for_aws_and_gcp():
    assert {_raw(path)["provider"]["type"] for path in CLUSTER_YAMLS} == {"aws", "gcp"}


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_validation(path: Path):
    validate_config(_prepared(path))
    raw = _raw(path)
    missing = [key for key in COMMAND_LISTS if key not in raw]
    assert not missing, f"{path.name} leaves {missing} to Ray's per-provider defaults"


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_runs_the_image_docker_readme_builds(path: Path):
    readme = (ROOT / "docker" / "README.md").read_text()
    readme_images = set(re.findall(r"YOUR_REGISTRY/veason-ray:[\w.-]+", readme))
    assert len(readme_images) == 1, readme_images
    docker = _raw(path)["docker"]
    assert docker["image"] == readme_images.pop()
    assert "head_image" not in docker and "worker_image" not in docker


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_head_has_cpus_and_no_gpu(path: Path):
    config = _prepared(path)
    head = config["available_node_types"][config["head_node_type"]]
    # It runs the job drivers, Ray Data decoding and Serve's proxy: `{"CPU": 0}` starved all three.
    assert head["resources"].get("CPU", 1) > 0 and head["resources"].get("GPU", 0) == 0
    assert not _has_gpu(config["provider"]["type"], head["node_config"])


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_autoscaler_sizes_the_gpu_pools(path: Path):
    config = _prepared(path)
    provider, types = config["provider"]["type"], config["available_node_types"]

    def gpus(name: str) -> int:
        return types[name]["resources"].get("GPU", 0)

    def spot(name: str) -> bool:
        return _is_spot(provider, types[name]["node_config"])

    for name in types:  # resources are what the autoscaler plans with: they must say what the machine has
        assert (gpus(name) > 0) == _has_gpu(provider, types[name]["node_config"]), name
    full_node = _node_type_to_launch(config, {"CPU": 1, "GPU": 8})
    assert gpus(full_node) == 8 and not spot(full_node)
    spot_node = _node_type_to_launch(config, {"CPU": 1, "GPU": 8}, busy=(full_node,))
    assert gpus(spot_node) == 8 and spot(spot_node)
    assert 0 < gpus(_node_type_to_launch(config, {"CPU": 1, "GPU": 1})) < 8
    assert gpus(_node_type_to_launch(config, {"CPU": 4})) == 0


def test_gcp_disks_are_in_the_providers_zone():
    for path in CLUSTER_YAMLS:
        config = _raw(path)
        if config["provider"]["type"] != "gcp":
            continue
        zone = config["provider"]["availability_zone"]
        for name, node_type in config["available_node_types"].items():
            for disk in node_type["node_config"]["disks"]:
                disk_type = disk["initializeParams"].get("diskType", f"zones/{zone}/")
                assert disk_type.startswith(f"zones/{zone}/"), (path.name, name, disk_type)


def test_dockerfile_builds_from_the_ray_image_of_our_pins():
    (base,) = re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.MULTILINE)
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)-cu(?P<cuda>\d+)", base)
    assert match, f"{base} is not a pinned rayproject/ray {{version}}-py{{XY}}-cu{{XYZ}} image"
    assert "==" + match["ray"] == _pins(PROJECT["dependencies"])["ray"]
    python = f"{match['py']}.{match['minor']}"
    assert python == DEVICE_PYTHON and SpecifierSet(PROJECT["requires-python"]).contains(python)
    # torch's CUDA build (its wheel index) is the image's CUDA toolkit, which JIT-compiled kernels build with.
    assert re.findall(r"download\.pytorch\.org/whl/(cu\d+)", DOCKERFILE) == [f"cu{match['cuda']}"]
    assert "constraints/gpu.txt" in DOCKERFILE and "SAM2_BUILD_CUDA=0" in DOCKERFILE


def test_gpu_constraints_repeat_pyproject_pins():
    constraints = [Requirement(line) for line in _constraint_lines()]
    assert all(not req.extras for req in constraints), "pip rejects extras in a constraints file"
    pinned = _pins([str(req) for req in constraints])
    assert len(pinned) == len(constraints), "every constraint is an exact pin"
    expected = _pins(PROJECT["dependencies"]) | _pins(PROJECT["optional-dependencies"]["gpu"])
    assert {name: pinned.get(name) for name in expected} == expected
    # and no pin falls outside a range that the base dependencies allow
    for line in PROJECT["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in pinned:
            version = pinned[name].removeprefix("==")
            assert req.specifier.contains(version, prereleases=True), (line, version)
