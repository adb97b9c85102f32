"""What a team deploys (infra/): every YAML loads, carries the fields KubeRay / the Ray
cluster launcher require, and names this project's images, versions and commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from iqray.jobs.clean import CleanConfig
from iqray.jobs.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
PYPROJECT = (REPO / "pyproject.toml").read_text()  # (tomllib is 3.11+; iqray runs on 3.10)
VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, re.M).group(1)
PINS = dict(re.findall(r'"([A-Za-z0-9_.-]+)(==[^"]+)"', PYPROJECT))
PACKAGE_DIRS = re.findall(r'"iqray\.\w+" = "(\w+)"', PYPROJECT)
IMAGE = re.compile(rf"^ghcr\.io/iqray/iqray:{re.escape(VERSION)}-(cpu|cuda)$")


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


def test_every_yaml_in_infra_loads():
    files = sorted(INFRA.rglob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert documents(str(path.relative_to(INFRA))), path


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__  # images run the Ray the code was tested on
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no scoring work on the head
    (head_container,) = head["template"]["spec"]["containers"]
    assert IMAGE.match(head_container["image"]).group(1) == "cpu"
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert IMAGE.match(container["image"]).group(1) == "cuda"
        limits = container["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
        # Enough CPUs beside each GPU that decode is not the bottleneck.
        assert int(limits["cpu"]) >= 8 * int(limits["nvidia.com/gpu"])
    if spec.get("enableInTreeAutoscaling"):
        assert any(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"])


def test_raycluster_has_a_cpu_head_and_an_autoscaling_gpu_group():
    (cluster,) = documents("kuberay/raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["name"]
    check_ray_cluster_spec(cluster["spec"])


def test_rayjob_runs_the_nightly_clean_with_a_config_that_validates():
    (job,) = documents("kuberay/rayjob-clean.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(spec["rayClusterSpec"])
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "iqray"
    args = build_parser().parse_args(argv[1:])  # the real CLI accepts the entrypoint
    assert args.job == "clean" and str(args.config) == "/etc/iqray/clean.yaml"
    # The ConfigMap mounted at /etc/iqray holds a clean.yaml that CleanConfig accepts.
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"]
                 if m["mountPath"] == "/etc/iqray")
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    (config_map,) = documents("kuberay/iqray-clean-config.yaml")
    assert config_map["kind"] == "ConfigMap"
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    clean = CleanConfig.model_validate(yaml.safe_load(config_map["data"]["clean.yaml"]))
    assert clean.sources and clean.output.startswith("s3://")


def test_cronjob_creates_the_rayjob_nightly_one_at_a_time():
    (cron,) = documents("kuberay/cronjob-nightly.yaml")
    assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5 and spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:3] == ["kubectl", "create", "-f"]
    assert Path(container["command"][3]).name == "rayjob-clean.yaml"
    assert pod["restartPolicy"] in ("Never", "OnFailure")


def test_cluster_launcher_yaml_names_its_node_types_and_images():
    (cluster,) = documents("ray/cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in cluster
    assert cluster["head_node_type"] in cluster["available_node_types"]
    for node in cluster["available_node_types"].values():
        assert "node_config" in node and "resources" in node
    assert IMAGE.match(cluster["docker"]["image"]).group(1) == "cuda"
    assert IMAGE.match(cluster["docker"]["head_image"]).group(1) == "cpu"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_install_the_pinned_stack_and_run_as_a_user(dockerfile):
    text = (INFRA / dockerfile).read_text()
    for name in ("torch", "torchvision"):
        assert name + PINS[name] in text
    # The package folders the pyproject maps into iqray.* are all copied in.
    assert PACKAGE_DIRS == ["model", "pipeline", "jobs"]
    for folder in PACKAGE_DIRS:
        assert re.search(rf"^COPY {folder} {folder}$", text, re.M), folder
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "pip install ." in text
    python = re.search(r"python:?(3\.\d+)", text).group(1)
    assert python == "3.11"  # one Python on every node (Ray refuses mixed versions)
