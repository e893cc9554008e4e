"""deploy/: the Kubernetes manifests and the NGC-based Dockerfile, validated offline: every object
parsed into the `kubernetes` client's models (and back, nothing dropped), the pieces agree with
each other and with `diffugts.server_security`, and checkov's policies pass (skips are explicit)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"


def manifests():
    """(file, object) for every Kubernetes object (kustomization files are kustomize's, not objects)."""
    out = []
    for path in sorted(KUBE.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def model_name(obj) -> str:
    version = obj["apiVersion"].split("/")[-1]
    return version[0].upper() + version[1:] + obj["kind"]


def parse(obj):
    from kubernetes.client import ApiClient

    return ApiClient().deserialize(json.dumps(obj), model_name(obj), "application/json")


def by_kind(kind):
    return {obj["metadata"]["name"]: obj for _, obj in manifests() if obj["kind"] == kind}


def test_every_object_parses_into_the_kubernetes_models_and_back():
    from kubernetes.client import ApiClient

    found = manifests()
    kinds = sorted({obj["kind"] for _, obj in found})
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Namespace", "NetworkPolicy",
                     "PodDisruptionBudget", "Service", "ServiceAccount"]
    for path, obj in found:
        model = parse(obj)
        assert type(model).__name__ == "V1" + obj["kind"] or type(model).__name__ == model_name(obj)
        # the models drop keys they do not know: a round trip that loses nothing means no typo
        assert ApiClient().sanitize_for_serialization(model) == obj, path
        assert obj["metadata"].get("namespace", "diffugts") == "diffugts"


def test_kustomizations_list_every_manifest():
    listed = set()
    for kustomization in KUBE.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text())["resources"]:
            target = (kustomization.parent / resource).resolve()
            assert target.exists(), f"{kustomization}: {resource}"
            listed.add(target)
    files = {p.resolve() for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files <= listed


def test_deployments_probes_secrets_and_hardening():
    deployments = {name: parse(obj) for name, obj in by_kind("Deployment").items()}
    assert set(deployments) == {"diffugts-triton-cpu", "diffugts-triton-gpu"}
    for name, deployment in deployments.items():
        pod = deployment.spec.template.spec
        (container,) = pod.containers
        assert container.startup_probe.http_get.path == "/v2/health/ready"
        assert container.readiness_probe.http_get.path == "/v2/health/ready"
        assert container.liveness_probe.http_get.path == "/v2/health/live"
        assert {p.name: p.container_port for p in container.ports} == {"http": 8000, "grpc": 8001, "metrics": 8002}
        assert all(probe.http_get.port == "http" for probe in
                   (container.startup_probe, container.readiness_probe, container.liveness_probe))
        # the token and TLS key come from Secrets, as files only the pod's group can read
        volumes = {v.name: v for v in pod.volumes}
        assert volumes["token"].secret.secret_name == "diffugts-token"
        assert volumes["tls"].secret.secret_name == "diffugts-tls"
        assert volumes["token"].secret.default_mode == 0o440 and volumes["tls"].secret.default_mode == 0o440
        mounts = {m.name: m.mount_path for m in container.volume_mounts}
        assert mounts["token"] == "/var/run/secrets/diffugts"  # where the Dockerfile's entry point reads it
        assert not any(e.value_from and e.value_from.secret_key_ref for e in container.env or [])
        assert f"--tls-cert={mounts['tls']}/tls.crt" in container.args
        assert container.args[container.args.index("--") + 1] == "tritonserver"
        security = container.security_context
        assert security.read_only_root_filesystem and not security.allow_privilege_escalation
        assert security.capabilities.drop == ["ALL"] and pod.security_context.run_as_non_root
        assert pod.automount_service_account_token is False
        assert container.resources.requests and container.resources.limits
        gpus = (container.resources.limits or {}).get("nvidia.com/gpu")
        assert (gpus == "1") == name.endswith("-gpu")
        assert container.image.endswith("-gpu" if name.endswith("-gpu") else "-cpu")


def test_headless_service_selects_both_variants():
    (service,) = [parse(obj) for obj in by_kind("Service").values()]
    assert service.spec.cluster_ip == "None"  # headless: clients see every pod and balance themselves
    for obj in by_kind("Deployment").values():
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert service.spec.selector.items() <= labels.items()
    assert {p.name: p.port for p in service.spec.ports} == {"grpc": 8001, "http": 8000, "metrics": 8002}


def test_autoscalers_scale_on_triton_queue_time():
    hpas = {name: parse(obj) for name, obj in by_kind("HorizontalPodAutoscaler").items()}
    deployments = by_kind("Deployment")
    assert set(hpas) == set(deployments)
    for name, hpa in hpas.items():
        assert hpa.spec.scale_target_ref.kind == "Deployment" and hpa.spec.scale_target_ref.name == name
        (metric,) = hpa.spec.metrics
        assert metric.type == "Pods" and metric.pods.metric.name == "nv_inference_queue_duration_us_per_request"
        assert 1 <= hpa.spec.min_replicas < hpa.spec.max_replicas
    rules = yaml.safe_load(by_kind("ConfigMap")["diffugts-prometheus-adapter-rules"]["data"]["config.yaml"])
    (rule,) = rules["rules"]
    assert rule["name"]["as"] == "nv_inference_queue_duration_us_per_request"
    assert "nv_inference_queue_duration_us{" in rule["metricsQuery"]  # Triton's own counter


def test_dockerfile_builds_on_ngc_triton_and_enters_through_server_security(tmp_path):
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG TRITON_TAG=\d\d\.\d\d$", text, re.M)
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3" in text
    assert re.search(r"^USER 10001", text, re.M) and "HEALTHCHECK" in text
    entry = json.loads(re.search(r"^ENTRYPOINT (.*)$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (.*)$", text, re.M).group(1))
    assert entry[:3] == ["python3", "-m", "diffugts.server_security"]
    # run the entry point as the container would, with `echo` in place of tritonserver
    token = tmp_path / "token"
    token.write_text("k" * 43)
    token.chmod(0o440)
    args = [sys.executable, "-m", "diffugts.server_security", "--token-file", str(token)]
    deployment = by_kind("Deployment")["diffugts-triton-cpu"]["spec"]["template"]["spec"]["containers"][0]["args"]
    tls = [tmp_path / "tls.crt", tmp_path / "tls.key"]
    for path in tls:
        path.write_text("pem")
    deployment = [a.replace("/var/run/secrets/diffugts-tls", str(tmp_path)) for a in deployment]
    for tail in (cmd, deployment):
        tail = [("echo" if a == "tritonserver" else a) for a in tail]
        out = subprocess.run(args + tail, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        flags = out.stdout.split()
        assert flags[0] == "--model-repository=/models"
        assert f"--grpc-restricted-protocol=inference,metadata,model-config,shared-memory,statistics:diffugts-token={'k' * 43}" in flags
        assert "--model-control-mode=none" in flags and "--exit-on-error=true" in flags
    assert "--grpc-use-ssl=true" in flags
    refused = subprocess.run(args[:-2] + ["--token-file", str(tmp_path / "absent" / "x"), "--", "echo"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0


def checkov_binary():
    for candidate in (os.environ.get("CHECKOV"), ROOT / ".venv-checkov" / "bin" / "checkov", shutil.which("checkov")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


@pytest.mark.slow
def test_checkov_policies_pass():
    binary = checkov_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("checkov is missing: `make test` installs it (`make checkov`)")
        pytest.skip("checkov not installed here: `make checkov` (CI always runs this test)")
    out = subprocess.run([binary, "-d", str(DEPLOY), "--framework", "kubernetes", "dockerfile", "--skip-download",
                          "-o", "json"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    summary = {r["check_type"]: r["summary"] for r in reports}
    assert set(summary) == {"kubernetes", "dockerfile"}
    failed = [(c["check_id"], c["resource"], c["file_path"]) for r in reports for c in r["results"]["failed_checks"]]
    assert not failed
    assert all(s["parsing_errors"] == 0 for s in summary.values())
    # the only skips are the ones written down, each with its reason beside it
    skipped = {(c["check_id"], c["resource"]) for r in reports for c in r["results"]["skipped_checks"]}
    assert skipped == {("CKV_K8S_43", "Deployment.diffugts.diffugts-triton-cpu"),
                       ("CKV_K8S_43", "Deployment.diffugts.diffugts-triton-gpu")}
    for obj in by_kind("Deployment").values():
        reason = obj["metadata"]["annotations"]["checkov.io/skip1"]
        assert reason.startswith("CKV_K8S_43=") and len(reason) > 40
