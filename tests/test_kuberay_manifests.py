"""The KubeRay manifests (cluster/kuberay/*.yaml) pass KubeRay's CRD schema and the Kubernetes API types
(tests/kuberay_schema.py), run the image and node types of the cluster launcher YAMLs, carry one cluster spec, and
start real `veason` commands whose configs and overrides load and whose outputs survive the cluster."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes.client.models
import pytest
import tomllib
import yaml
from kuberay_schema import SCHEMA_DIR, k8s_errors, load_schema, manifest_errors
from packaging.requirements import Requirement

from pipelines.cli import SUBCOMMANDS
from pipelines.job_paths import OUTPUT_KEYS, relative_path_problems
from veason_ray.config_loading import load_config
from veason_ray.object_store import is_s3_uri

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "cluster" / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
CLUSTER_YAMLS = sorted((ROOT / "cluster").glob("*.yaml"))
SERVE_CONFIG = ROOT / "configs" / "serve" / "veason-3b-1gpu.yaml"
JOB_PROGRAMS = ("sft", "grpo", "eval")
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
# The image's copy of the project (the WORKDIR of the build steps) and the folders COPY puts there.
IMAGE_PROJECT = PurePosixPath(re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE, re.M)[0])
IMAGE_FOLDERS = set(re.findall(r"^COPY\s+(?:--\S+\s+)*\S+\s+(\S+)$", DOCKERFILE, re.M))
# The one documented difference of rayservice.yaml's cluster: the Serve app's bearer key in every container.
SERVE_KEY_SECRET = "veason-serve"


def _load(path: Path) -> dict[str, Any]:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1, f"{path.name}: one manifest per file"
    return docs[0]


def _by_name(name: str) -> dict[str, Any]:
    return _load(KUBERAY / name)


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }[doc["kind"]]


def _pod_specs(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]) for name, group in groups]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pods = [spec for _, spec in _pod_specs(_cluster_spec(doc))]
    if "submitterPodTemplate" in doc["spec"]:
        pods.append(doc["spec"]["submitterPodTemplate"]["spec"])
    return [c for pod in pods for c in pod.get("initContainers", []) + pod["containers"]]


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _without_serve_key(cluster: dict[str, Any]) -> dict[str, Any]:
    """rayservice.yaml's cluster spec less its documented difference (env entries from the Serve key Secret)."""
    cluster = copy.deepcopy(cluster)
    for _, pod in _pod_specs(cluster):
        for container in pod["containers"]:
            env = [e for e in container.get("env", []) if _secret_of(e) != SERVE_KEY_SECRET]
            container.pop("env", None)
            if env:
                container["env"] = env
    return cluster


def _secret_of(env: dict[str, Any]) -> str | None:
    return env.get("valueFrom", {}).get("secretKeyRef", {}).get("name")


def _launcher_yamls() -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in CLUSTER_YAMLS]


def _entrypoint(name: str) -> list[str]:
    return shlex.split(_by_name(f"rayjob-{name}.yaml")["spec"]["entrypoint"])


# --- the schema -------------------------------------------------------------------------------------------------


def test_there_is_a_raycluster_a_rayjob_per_program_and_a_rayservice():
    kinds = {path.name: _load(path)["kind"] for path in MANIFESTS}
    expected = {f"rayjob-{p}.yaml": "RayJob" for p in JOB_PROGRAMS}
    assert kinds == expected | {"raycluster.yaml": "RayCluster", "rayservice.yaml": "RayService"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_the_kuberay_crd_schema(path: Path):
    assert manifest_errors(_load(path)) == []


def _broken(name: str, change) -> dict[str, Any]:
    doc = copy.deepcopy(_by_name(name))
    change(doc)
    return doc


def _head(doc):
    return doc["spec"]["headGroupSpec"]


def _worker(doc):
    return doc["spec"]["workerGroupSpecs"][0]


def _head_container(doc):
    return _head(doc)["template"]["spec"]["containers"][0]


BROKEN = {
    "ray.io field misspelled": (
        "raycluster.yaml",
        lambda d: _worker(d).update(maxReplica=_worker(d).pop("maxReplicas")),
        "workerGroupSpecs[0]: Additional properties are not allowed ('maxReplica' was unexpected)",
    ),
    "ray.io required field missing": (
        "raycluster.yaml",
        lambda d: _worker(d).pop("groupName"),
        "workerGroupSpecs[0]: 'groupName' is a required property",
    ),
    "ray.io wrong type": (
        "raycluster.yaml",
        lambda d: _worker(d).update(maxReplicas="4"),
        "workerGroupSpecs[0].maxReplicas: '4' is not of type 'integer'",
    ),
    "ray.io int32 overflow": (
        "raycluster.yaml",
        lambda d: _worker(d).update(maxReplicas=2**31),
        "maxReplicas: 2147483648 is not a 'int32'",
    ),
    "ray.io enum": (
        "raycluster.yaml",
        lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"),
        "autoscalerOptions.upscalingMode: 'Fast' is not one of",
    ),
    "rayStartParams value not a string": (
        "raycluster.yaml",
        lambda d: _head(d)["rayStartParams"].update({"num-gpus": 0}),
        "rayStartParams.num-gpus: 0 is not of type 'string'",
    ),
    "pod field misspelled": (
        "raycluster.yaml",
        lambda d: _head(d)["template"]["spec"].update(nodeSelecter={}),
        "unknown field 'nodeSelecter' of V1PodSpec (did you mean 'nodeSelector'?)",
    ),
    "container field misspelled": (
        "raycluster.yaml",
        lambda d: _head_container(d).update(workDir="/tmp"),
        "containers[0]: unknown field 'workDir' of V1Container",
    ),
    "container port not an integer": (
        "raycluster.yaml",
        lambda d: _head_container(d)["ports"][0].update(containerPort="6379"),
        "ports[0].containerPort: expected an integer, got '6379'",
    ),
    "container without a name": (
        "raycluster.yaml",
        lambda d: _head_container(d).pop("name"),
        "missing required field 'name' of V1Container",
    ),
    "quantity that is not one": (
        "raycluster.yaml",
        lambda d: _head_container(d)["resources"]["limits"].update(cpu="lots"),
        "resources.limits.cpu: expected a number or a quantity string, got 'lots'",
    ),
    "emptyDir medium not a string": (
        "raycluster.yaml",
        lambda d: _head(d)["template"]["spec"]["volumes"][0]["emptyDir"].update(medium=["Memory"]),
        "emptyDir.medium: expected a string",
    ),
    "status in a manifest": (
        "raycluster.yaml",
        lambda d: d.update(status={"state": "ready"}),
        "<root>: Additional properties are not allowed ('status' was unexpected)",
    ),
    "old apiVersion": (
        "raycluster.yaml",
        lambda d: d.update(apiVersion="ray.io/v1alpha1"),
        "expected apiVersion ray.io/v1",
    ),
    "metadata field misspelled": (
        "raycluster.yaml",
        lambda d: d["metadata"].update(lables={}),
        "metadata: unknown field 'lables' of V1ObjectMeta",
    ),
    "RayJob field misspelled": (
        "rayjob-grpo.yaml",
        lambda d: d["spec"].update(shutdownAfterJobFinish=d["spec"].pop("shutdownAfterJobFinishes")),
        "'shutdownAfterJobFinish' was unexpected",
    ),
    "RayJob wrong type": (
        "rayjob-grpo.yaml",
        lambda d: d["spec"].update(ttlSecondsAfterFinished="600"),
        "spec.ttlSecondsAfterFinished: '600' is not of type 'integer'",
    ),
    "RayJob's cluster spec misspelled (through the $ref)": (
        "rayjob-grpo.yaml",
        lambda d: d["spec"]["rayClusterSpec"].update(enableInTreeAutoscale=True),
        "spec.rayClusterSpec: Additional properties are not allowed ('enableInTreeAutoscale' was unexpected)",
    ),
    "RayService serveConfigV2 not a string": (
        "rayservice.yaml",
        lambda d: d["spec"].update(serveConfigV2=yaml.safe_load(d["spec"]["serveConfigV2"])),
        "is not of type 'string'",
    ),
    "RayService without its cluster": (
        "rayservice.yaml",
        lambda d: d["spec"].pop("rayClusterConfig"),
        "spec: 'rayClusterConfig' is a required property",
    ),
    "RayService pod type mismatch": (
        "rayservice.yaml",
        lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["template"]["spec"].update(
            tolerations={}
        ),
        "workerGroupSpecs[1].template.spec.tolerations: expected a list (List[V1Toleration])",
    ),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_schema_refuses_a_broken_manifest(case: str):
    """The validator bites: each deliberate mistake gives the error that names it, at its path."""
    name, change, expected = BROKEN[case]
    errors = manifest_errors(_broken(name, change))
    assert any(expected in error for error in errors), "\n".join(errors) or "no errors"


def test_k8s_models_walk_lists_and_maps():
    errors = list(
        k8s_errors({"containers": [{"name": "a", "env": [{"name": "X", "valu": "1"}]}]}, "V1PodSpec")
    )
    assert errors == [
        ("unknown field 'valu' of V1EnvVar (did you mean 'value'?)", ("containers", 0, "env", 0))
    ]
    assert list(k8s_errors({"a": "1", "b": 2}, "Dict[str, str]")) == [("expected a string, got 2", ("b",))]


def test_every_marker_names_a_kubernetes_model():
    """A misspelled marker would otherwise fail only for a manifest that sets the field it marks."""
    source = yaml.safe_load((SCHEMA_DIR / "SOURCE.yaml").read_text())
    markers: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if source["marker"] in node:
                markers.add(node[source["marker"]])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    for name in source["files"]:
        walk(load_schema(name))
    assert markers >= {"V1PodSpec", "V1ServiceSpec", "V1EnvVar", "V1ResourceRequirements"}
    assert [m for m in markers if not hasattr(kubernetes.client.models, m)] == []


def test_schema_source_names_a_release_commit_and_the_readme_installs_it():
    source = yaml.safe_load((SCHEMA_DIR / "SOURCE.yaml").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]) and source["repository"] == "ray-project/kuberay"
    release = re.fullmatch(r"v(\d+\.\d+\.\d+)", source["kuberay_release"])
    assert release, source["kuberay_release"]
    readme = (KUBERAY / "README.md").read_text()
    assert f"kuberay/kuberay-operator --version {release[1]}" in readme
    assert f"KubeRay {source['kuberay_release']}" in readme


# --- image, nodes and the one cluster spec ----------------------------------------------------------------------


def test_every_container_runs_the_image_of_the_cluster_yamls():
    launcher_images = {config["docker"]["image"] for config in _launcher_yamls()}
    readme_images = set(
        re.findall(r"YOUR_REGISTRY/veason-ray:[\w.-]+", (ROOT / "docker" / "README.md").read_text())
    )
    assert len(launcher_images) == 1 and launcher_images == readme_images
    image = launcher_images.pop()
    assert image.startswith("YOUR_REGISTRY/")  # the placeholder registry, spelled as in cluster/*.yaml
    for path in MANIFESTS:
        doc = _load(path)
        assert {c["image"] for c in _containers(doc)} == {image}, path.name
        assert "image" not in _cluster_spec(doc)["autoscalerOptions"]  # the sidecar runs the head's image
        assert {c.get("workingDir") for c in _containers(doc)} == {str(IMAGE_PROJECT)}, path.name


def test_rayjobs_and_rayservice_carry_the_rayclusters_spec():
    spec = _by_name("raycluster.yaml")["spec"]
    for program in JOB_PROGRAMS:
        assert _by_name(f"rayjob-{program}.yaml")["spec"]["rayClusterSpec"] == spec, program
    service_cluster = _by_name("rayservice.yaml")["spec"]["rayClusterConfig"]
    assert _without_serve_key(service_cluster) == spec
    serve_cfg = load_config(ROOT / _serve_application()["args"]["config"])
    for _, pod in _pod_specs(service_cluster):
        for container in pod["containers"]:
            keys = [e for e in container["env"] if _secret_of(e) == SERVE_KEY_SECRET]
            assert [e["name"] for e in keys] == [serve_cfg.serve.api_key_env]


def test_head_has_cpus_and_no_gpu():
    head = _by_name("raycluster.yaml")["spec"]["headGroupSpec"]
    pod = head["template"]["spec"]
    (container,) = pod["containers"]
    # As in the cluster YAMLs: the CPUs that the job drivers and Ray Data decoding use (`num-cpus: "0"` would starve
    # them), no GPU; the pod's CPUs beyond Ray's are for the GCS and the dashboard.
    (launcher_cpus,) = {
        c["available_node_types"][c["head_node_type"]]["resources"]["CPU"] for c in _launcher_yamls()
    }
    assert (
        head["rayStartParams"]["num-cpus"] == str(launcher_cpus) and head["rayStartParams"]["num-gpus"] == "0"
    )
    assert float(container["resources"]["limits"]["cpu"]) > launcher_cpus
    assert _gpus(container) == 0 and "nvidia.com/gpu" not in container["resources"]["requests"]
    assert "tolerations" not in pod and "nodeSelector" not in pod


def test_worker_groups_mirror_the_cluster_yaml_node_types():
    groups: dict[int, dict[str, Any]] = {}  # by GPUs per pod
    for group in _by_name("raycluster.yaml")["spec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["requests"] == container["resources"]["limits"], group["groupName"]
        assert group["minReplicas"] == 0 and group["replicas"] == 0, group["groupName"]
        groups[_gpus(container)] = group
    for config in _launcher_yamls():
        provider, by_gpus = config["provider"]["type"], {}
        for name, node_type in config["available_node_types"].items():
            if name != config["head_node_type"]:
                by_gpus.setdefault(node_type["resources"].get("GPU", 0), []).append(node_type)
        assert set(groups) == set(by_gpus), provider
        for gpus, node_types in by_gpus.items():
            group = groups[gpus]
            # the pools' size: every node type of that many GPUs (on-demand and spot) together
            assert group["maxReplicas"] == sum(t["max_workers"] for t in node_types), (provider, gpus)
            # the pod fits the node type's machine, with room for the kubelet and DaemonSets
            cpus = float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
            assert cpus < min(t["resources"]["CPU"] for t in node_types), (provider, gpus)
    for gpus, group in groups.items():
        pod = group["template"]["spec"]
        if gpus:
            assert (
                pod["nodeSelector"]
                and {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                in (pod["tolerations"])
            )
        else:
            assert group["rayStartParams"]["num-gpus"] == "0" and "tolerations" not in pod


def test_autoscaling_and_ray_version_match_the_cluster_yamls_and_pins():
    cluster = _by_name("raycluster.yaml")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    (idle_minutes,) = {config["idle_timeout_minutes"] for config in _launcher_yamls()}
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 60 * idle_minutes
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [Requirement(d) for d in dependencies if Requirement(d).name == "ray"]
    assert str(ray.specifier) == f"=={cluster['rayVersion']}"


def test_every_pod_has_a_memory_volume_at_dev_shm_and_s3_credentials_from_the_secret():
    for name, pod in _pod_specs(_by_name("raycluster.yaml")["spec"]):
        in_memory = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        for container in pod["containers"]:
            assert {
                m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"
            } & in_memory, name
            assert container["envFrom"] == [{"secretRef": {"name": "veason-s3"}}], name
            assert "env" not in container, name  # no credentials written into the manifest


# --- what the jobs and the service run --------------------------------------------------------------------------


@pytest.mark.parametrize("program", JOB_PROGRAMS)
def test_rayjob_entrypoint_is_a_veason_command_whose_config_and_overrides_load(program: str):
    argv = _entrypoint(program)
    assert argv[:2] == ["veason", program] and program in SUBCOMMANDS
    config, overrides = PurePosixPath(argv[2]), argv[3:]
    assert config.is_relative_to(IMAGE_PROJECT), f"{config}: not the image's copy of a config"
    assert config.relative_to(IMAGE_PROJECT).parts[0] in IMAGE_FOLDERS, f"{config}: not in the image"
    cfg = load_config(ROOT / config.relative_to(IMAGE_PROJECT), overrides)  # unknown keys or bad values raise
    # outputs outlive the job's cluster: s3:// or an absolute path on shared storage, never relative
    assert relative_path_problems(cfg, cwd=ROOT) == []
    outputs = {k: v for k, v in (o.split("=", 1) for o in overrides) if k in OUTPUT_KEYS}
    assert outputs and all(is_s3_uri(v) or PurePosixPath(v).is_absolute() for v in outputs.values())
    assert all(
        v.startswith(("s3://YOUR-BUCKET/", "/shared/")) for _, v in (o.split("=", 1) for o in overrides)
    )


@pytest.mark.parametrize("program", JOB_PROGRAMS)
def test_rayjob_deletes_its_cluster_after_the_job(program: str):
    spec = _by_name(f"rayjob-{program}.yaml")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


def _serve_application() -> dict[str, Any]:
    (app,) = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]
    return app


def test_rayservice_serves_the_serve_config_file():
    service = _by_name("rayservice.yaml")
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load(SERVE_CONFIG.read_text())
    app = _serve_application()
    assert app["import_path"] == "serve.app:app_builder"
    # args.config is relative to the working directory Ray starts in, the image's project folder (the containers'
    # workingDir, test_every_container_runs_the_image_of_the_cluster_yamls), which holds it
    config = PurePosixPath(app["args"]["config"])
    assert not config.is_absolute() and config.parts[0] in IMAGE_FOLDERS
    load_config(ROOT / config, app["args"]["overrides"])
    gpu_groups = [
        g
        for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        if _gpus(g["template"]["spec"]["containers"][0])
    ]
    assert gpu_groups, "the Serve replicas need a GPU worker group"
