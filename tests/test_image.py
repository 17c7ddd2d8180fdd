"""The container image: lint, deploy examples that agree with the server, and the
real image built from the Dockerfile, started, probed, called, stopped and restarted.

The build needs root (debootstrap, buildah with chroot isolation); scripts/build-image.sh
installs buildah and debootstrap from Debian when they are missing. It takes ~2-3 min
the first time (~40 s with the base cached), so it is marked ``image``; CI runs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from simserve.serve.app import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {f"SIMSERVE_{f.name.upper()}" for f in fields(ServerConfig)}


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_runs_as_the_non_root_user_the_deploy_examples_expect():
    users = re.findall(r"^USER (\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    serve_user = users[0]  # the serve stage's user (the train stage switches to root and back)
    assert serve_user == "10001:10001" and users[-1] == serve_user
    k8s = list(yaml.safe_load_all((ROOT / "deploy/kubernetes.yaml").read_text()))
    pod = next(d for d in k8s if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"]


def test_deploy_examples_use_real_server_options_and_grpc_probes():
    k8s = list(yaml.safe_load_all((ROOT / "deploy/kubernetes.yaml").read_text()))
    container = next(d for d in k8s if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"] for e in container["env"]} <= OPTIONS
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ServerConfig.port
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/data"}
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())["services"]["simserve"]
    assert set(compose["environment"]) <= OPTIONS
    assert "simserve-data:/data" in compose["volumes"]


def test_milvus_examples_point_every_replica_at_one_milvus_and_scale_on_queue_depth():
    from simserve.serve.metrics import Metrics

    k8s = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy/milvus/kubernetes.yaml").read_text())}
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert set(env) <= OPTIONS and env["SIMSERVE_INDEX_BACKEND"] == "milvus" and env["SIMSERVE_MILVUS_URI"] == "http://milvus:19530"
    assert k8s["Deployment"]["spec"]["replicas"] >= 2 and pod["securityContext"]["runAsUser"] == 10001
    metric = k8s["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in {m.name for m in Metrics().registry.collect()}  # the HPA scales on a metric the server exports
    compose = yaml.safe_load((ROOT / "deploy/milvus/compose.yaml").read_text())["services"]
    assert set(compose["simserve"]["environment"]) <= OPTIONS and compose["simserve"]["environment"]["SIMSERVE_MILVUS_URI"] == "http://milvus:19530"
    assert "milvus" in compose and re.search(r"^ARG EXTRAS=", (ROOT / "Dockerfile").read_text(), re.M)  # --build-arg EXTRAS=milvus


@pytest.mark.image
@pytest.mark.timeout(1200)
def test_image_builds_serves_drains_and_keeps_its_data(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("building the image needs root (debootstrap, buildah chroot isolation)")
    build = subprocess.run([str(ROOT / "scripts/build-image.sh")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    check = subprocess.run([sys.executable, str(ROOT / "scripts/image_check.py")], capture_output=True, text=True)
    assert check.stdout, check.stderr[-3000:]
    result = json.loads(check.stdout)
    assert result["user"] == "10001:10001"
    assert result["entrypoint"] == ["simserve", "serve"]
    assert result["torch_installed"] is False  # the serving image is torch-free
    assert result["healthcheck_output"] == ["SERVING", 0]  # the image's own HEALTHCHECK command
    assert result["search_top"] == "seagull" and result["scores"]["copy"] > result["scores"]["different"]
    assert result["sigterm_exit_code"] == 0  # graceful drain
    assert result["items_after_restart"] == result["added"] == 2  # the volume kept the data
    assert result["search_top_after_restart"] == "seagull"
    assert result["ok"] and check.returncode == 0
