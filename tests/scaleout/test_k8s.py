"""deploy/k8s rendered by kustomize (kubectl's built-in) and validated offline against the Kubernetes OpenAPI
schemas (kubernetes-validate ships them), then checked against the app: probes on real routes, the image's port
and user, real settings, a grace period that covers the drain, autoscaler/budget/service on the right pods."""

import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from app.cli import build_parser
from app.core.config import Settings
from app.core.triton import RepositoryOptions
from tests.conftest import REPO_ROOT
from tests.test_containers import arguments_of, get_routes

K8S = REPO_ROOT / "deploy" / "k8s"
VARIANTS = ("base", "overlays/gpu", "overlays/triton")
# The oldest Kubernetes minor still commonly run, and the newest the schemas cover.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SERVICE = "lgg-tumor-service"
GPU = "nvidia.com/gpu"
DRAIN_MARGIN_S = 5  # for the process to exit after the drain


@cache
def render(variant: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    done = subprocess.run(["kubectl", "kustomize", str(K8S / variant)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return list(yaml.safe_load_all(done.stdout))


def resource(variant: str, kind: str, name: str = SERVICE) -> dict:
    [found] = [r for r in render(variant) if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def service_container(variant: str) -> dict:
    [container] = resource(variant, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def env(container: dict) -> dict[str, str]:
    return {variable["name"]: variable["value"] for variable in container.get("env", [])}


@pytest.fixture(scope="module")
def routes() -> set[str]:
    from app.main import app

    return get_routes(app)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_manifests_validate_against_the_kubernetes_schemas(variant: str, version: str) -> None:
    resources = render(variant)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= {r["kind"] for r in resources}
    for manifest in resources:
        kubernetes_validate.validate(manifest, version, strict=True)  # strict: an unknown field is an error


def test_the_validation_catches_a_misplaced_field() -> None:
    deployment = resource("base", "Deployment")
    broken = deployment | {"spec": deployment["spec"] | {"terminationGracePeriodSeconds": 45}}  # belongs to the pod
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriodSeconds"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_ask_the_app_and_the_port_is_the_image_s(variant: str, routes: set[str]) -> None:
    container = service_container(variant)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in routes
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" in routes
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["port"] == container["livenessProbe"]["httpGet"]["port"] == "http"
    assert [str(ports["http"])] == arguments_of("EXPOSE")


@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_as_the_image_s_unprivileged_user_with_requests_and_limits(variant: str) -> None:
    pod = resource(variant, "Deployment")["spec"]["template"]["spec"]
    container = service_container(variant)
    [user] = arguments_of("USER")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0] != "0"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert {"cpu", "memory"} <= set(requests) and requests == limits  # Guaranteed QoS


@pytest.mark.parametrize("variant", VARIANTS)
def test_environment_names_real_settings(variant: str) -> None:
    prefix = Settings.model_config["env_prefix"]
    for name, value in env(service_container(variant)).items():
        field = name.removeprefix(prefix).lower()
        assert name.startswith(prefix) and field in Settings.model_fields, name
        Settings(**{field: value})  # and the value parses


@pytest.mark.parametrize("variant", VARIANTS)
def test_grace_period_covers_the_pre_stop_pause_and_the_service_s_drain(variant: str) -> None:
    pod = resource(variant, "Deployment")["spec"]["template"]["spec"]
    container = service_container(variant)
    pause = re.fullmatch(
        r"import time; time\.sleep\((\d+(?:\.\d+)?)\)", container["lifecycle"]["preStop"]["exec"]["command"][2]
    )
    settings = Settings(**{k.removeprefix("LGG_").lower(): v for k, v in env(container).items()})
    # Kubernetes counts the grace period from the preStop hook on; SIGTERM comes after it.
    needed = float(pause.group(1)) + settings.shutdown_drain_s + settings.shutdown_grace_s + DRAIN_MARGIN_S
    assert pod["terminationGracePeriodSeconds"] >= needed


@pytest.mark.parametrize("variant", VARIANTS)
def test_autoscaler_budget_and_service_select_the_service_pods(variant: str) -> None:
    deployment = resource(variant, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = resource(variant, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": SERVICE}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    pdb = resource(variant, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] < hpa["minReplicas"]  # else a node drain could never evict a replica
    service = resource(variant, "Service")["spec"]
    assert service["selector"].items() <= labels.items()
    assert {port["targetPort"] for port in service["ports"]} <= {p["name"] for p in service_container(variant)["ports"]}


def test_only_the_gpu_variant_asks_for_a_gpu() -> None:
    gpu = service_container("overlays/gpu")
    assert gpu["resources"]["limits"][GPU] == gpu["resources"]["requests"][GPU] == 1
    assert Settings(providers=env(gpu)["LGG_PROVIDERS"]).providers.startswith("CUDAExecutionProvider")
    assert resource("overlays/gpu", "Deployment")["spec"]["template"]["spec"]["tolerations"][0]["key"] == GPU
    for variant in ("base", "overlays/triton"):
        assert GPU not in service_container(variant)["resources"]["limits"]


def test_triton_variant_points_the_service_at_the_triton_it_deploys() -> None:
    url = env(service_container("overlays/triton"))["LGG_TRITON_URL"]
    host, port = url.split(":")
    triton_service = resource("overlays/triton", "Service", host)
    assert int(port) in {p["port"] for p in triton_service["spec"]["ports"] if p["name"] == "grpc"}
    pod = resource("overlays/triton", "Deployment", "lgg-triton")["spec"]["template"]["spec"]
    [triton] = pod["containers"]
    assert triton_service["spec"]["selector"].items() <= pod_labels("lgg-triton").items()
    assert triton["resources"]["limits"][GPU] == 1
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # The init container runs the real export command into the folder Triton serves.
    [export] = pod["initContainers"]
    assert export["command"][:3] == ["python", "-m", "app.cli"]
    args = build_parser().parse_args(export["command"][3:])
    assert args.command == "triton-export" and args.model_dir == Path("/app/models")
    repository = next(a for a in triton["command"] if a.startswith("--model-repository=")).split("=")[1]
    assert str(args.out) == repository
    mounts = {m["name"]: m["mountPath"] for m in export["volumeMounts"]}
    assert (
        mounts["repository"] == repository == {m["name"]: m["mountPath"] for m in triton["volumeMounts"]}["repository"]
    )
    max_batch = int(env(service_container("overlays/triton"))["LGG_MAX_BATCH_SIZE"])
    assert max_batch <= args.max_batch_size == RepositoryOptions.max_batch_size


def pod_labels(name: str) -> dict[str, str]:
    return resource("overlays/triton", "Deployment", name)["spec"]["template"]["metadata"]["labels"]


def annotation_label(annotation: str) -> str:
    """Prometheus' kubernetes_sd meta label for a pod annotation (non-alphanumerics become underscores)."""
    return "__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", annotation)


def test_prometheus_scrapes_what_the_pods_announce(routes: set[str]) -> None:
    config = yaml.safe_load((K8S / "prometheus" / "scrape-config.yml").read_text())
    [job] = config["scrape_configs"]
    relabels = {tuple(r["source_labels"]): r for r in job["relabel_configs"]}
    assert relabels[(annotation_label("prometheus.io/scrape"),)]["action"] == "keep"
    assert relabels[(annotation_label("prometheus.io/path"),)]["target_label"] == "__metrics_path__"
    address = relabels[("__address__", annotation_label("prometheus.io/port"))]
    for name in (SERVICE, "lgg-triton"):
        template = resource("overlays/triton", "Deployment", name)["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert re.fullmatch(
            relabels[(annotation_label("prometheus.io/scrape"),)]["regex"], annotations["prometheus.io/scrape"]
        )
        ports = {p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}
        assert int(annotations["prometheus.io/port"]) in ports
        # The address rewrite, applied as Prometheus does (";"-joined source labels, anchored regex).
        joined = f"10.1.2.3:{min(ports)};{annotations['prometheus.io/port']}"
        target = re.sub(r"\$(\d)", r"\\\1", address["replacement"])
        assert re.fullmatch(address["regex"], joined).expand(target) == f"10.1.2.3:{annotations['prometheus.io/port']}"
    assert resource("base", "Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] in routes


def test_manifest_commands_in_the_docs_name_real_folders() -> None:
    docs = (REPO_ROOT / "docs" / "scale-out.md").read_text()
    folders = set(re.findall(r"kubectl (?:apply|kustomize) (?:-k )?(deploy/k8s/\S+)", docs))
    assert folders and all((REPO_ROOT / folder / "kustomization.yaml").is_file() for folder in folders), folders
    assert all(shlex.split(line) for line in docs.splitlines() if line.startswith("kubectl "))
