"""deploy/: the Kubernetes manifests and the Dockerfile agree with each other and with what `aira-opt serve` and
`triton-repo` use (Triton's ports, its health endpoints, the model repository's path)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from aira_opt.serve.server import EXIT_TIMEOUT_S, Ports

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PORT_NAMES = {"http": Ports.http, "grpc": Ports.grpc, "metrics": Ports.metrics}


def manifests() -> dict[str, dict]:
    docs = [d for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in yaml.safe_load_all(path.read_text())]
    return {d["kind"]: d for d in docs if d}


def container() -> dict:
    return manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def probe_paths() -> dict[str, str]:
    """Probe kind -> the HTTP path it asks (the live server test asks the same paths)."""
    return {kind: container()[kind]["httpGet"]["path"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}


def test_the_container_exposes_tritons_ports_by_name():
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == PORT_NAMES


def test_probes_use_tritons_health_endpoints_on_the_http_port():
    assert probe_paths() == {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
                             "livenessProbe": "/v2/health/live"}
    assert {container()[kind]["httpGet"]["port"] for kind in probe_paths()} == {"http"}


def test_the_service_routes_every_port_to_the_container():
    service = manifests()["Service"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        name: (port, name) for name, port in PORT_NAMES.items()}
    labels = manifests()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_the_autoscaler_scales_the_deployment_on_the_adapters_queue_metric():
    hpa, deployment = manifests()["HorizontalPodAutoscaler"], manifests()["Deployment"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    rules = yaml.safe_load(manifests()["ConfigMap"]["data"]["config.yaml"])["rules"]
    exposed = {rule["name"]["as"] for rule in rules}
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= exposed
    assert all("nv_inference_queue_duration_us" in rule["seriesQuery"] for rule in rules)


def test_shutdown_gets_longer_than_tritons_exit_timeout():
    args = container()["args"]
    assert f"--exit-timeout-secs={EXIT_TIMEOUT_S}" in args
    grace = manifests()["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > EXIT_TIMEOUT_S


def test_the_dockerfile_serves_the_repository_the_deployment_names():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    repository = re.search(r"COPY \$\{REPOSITORY\} (\S+)", dockerfile).group(1)
    assert f"--model-repository={repository}" in container()["args"]
    assert f'"--model-repository={repository}"' in dockerfile
    exposed = re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()
    assert sorted(map(int, exposed)) == sorted(PORT_NAMES.values())
    assert '"numpy<2"' in dockerfile and "--no-deps" in dockerfile  # the Python backend's numpy, and no PyTorch


def test_a_container_listens_on_every_interface_as_both_files_say_explicitly():
    """`aira-opt serve` binds 127.0.0.1 by default; a container must be reachable from outside, so deploy/ passes
    the addresses itself, the same in the Dockerfile and the Deployment."""
    addresses = [f"--{kind}-address=0.0.0.0" for kind in ("http", "grpc", "metrics")]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert all(a in container()["args"] for a in addresses)
    assert all(f'"{a}"' in dockerfile for a in addresses)
