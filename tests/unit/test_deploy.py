"""`deploy/` matches the code: the base, every kustomize overlay and every component
(on the base), rendered here, validate against the Kubernetes schemas
(kubernetes-validate, offline), and their ports, probes, settings, volumes, selectors,
metric names, gRPC method names and compute threads are the ones the server uses (read
from the code, not copied). The Dockerfiles' install line and entrypoint are run the
way the image runs them.

The renderer is the subset of kustomize these manifests use: `resources` (files and
folders), `components` (folders of `kind: Component`: their resources join, their
patches apply to all accumulated so far), `patches` by file (strategic merge: maps
merge, `null` deletes a key, lists of named items merge by `name` (the patch's first, in its order, as
kustomize orders them), other lists are replaced; `$patch: delete` removes a resource) and `images` (new tag or name). Where
`kubectl` is on the PATH, its bundled kustomize renders every target too, and must give
the same resources.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from rnnserve.service.metrics import METRICS, metric_names
from rnnserve.service.server import HEALTH_SERVICE, KSERVE_SERVICE, NATIVE_SERVICE, SERVICES
from rnnserve.service.settings import Settings, auto_compute_threads, available_cpus

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBE / "overlays").iterdir() if p.is_dir())
COMPONENTS = sorted(p.name for p in (KUBE / "components").iterdir() if p.is_dir())
# What is rendered and checked: the base, each overlay, each component on the base.
TARGETS = ["base", *OVERLAYS, *(f"base+{c}" for c in COMPONENTS)]
# What opts into the add-ons (CRDs of the Prometheus Operator, a custom metrics API).
WITH_COMPONENT = {c: {"prometheus-operator", f"base+{c}"} for c in COMPONENTS}
# The oldest Kubernetes the manifests promise (native gRPC probes are GA in 1.27) and
# the newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRDS = {"monitoring.coreos.com/v1": {"ServiceMonitor", "PrometheusRule"}}
# Labels Prometheus adds from the scrape target (ServiceMonitor) besides the metrics' own.
TARGET_LABELS = {"namespace", "pod", "le"}
METRIC_LABELS = {"model", "version", "method", "code"}


# -- the kustomize subset -----------------------------------------------------------------
def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        for key, value in patch.items():
            if value is None:
                base.pop(key, None)
            elif key in base:
                base[key] = _merge(base[key], value)
            else:
                base[key] = copy.deepcopy(value)
        return base
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(item, dict) and "name" in item for item in [*base, *patch])
    ):
        # kustomize's order: the patch's items (merged) in its order, then the others
        by_name = {item["name"]: item for item in base}
        merged = [
            _merge(by_name[item["name"]], item) if item["name"] in by_name else copy.deepcopy(item)
            for item in patch
        ]
        named = {item["name"] for item in patch}
        return merged + [item for item in base if item["name"] not in named]
    return copy.deepcopy(patch)


def _pod_containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def render(
    folder: Path,
    kustomization: dict[str, Any] | None = None,
    accumulated: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """`folder`'s kustomization (or `kustomization`, as if it were in `folder`); a
    Component works on the resources `accumulated` by the kustomization using it."""
    if kustomization is None:
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "components", "patches", "images"}
    unknown = set(kustomization) - known
    assert not unknown, f"{folder}: the test's renderer does not know {unknown}"
    component = kustomization["kind"] == "Component"
    assert component == (accumulated is not None), f"{folder}: {kustomization['kind']}"
    docs: list[dict[str, Any]] = accumulated if accumulated is not None else []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        docs += render(path) if path.is_dir() else _load_all(path)
    for path in kustomization.get("components", []):
        docs = render(folder / path, accumulated=docs)
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, entry
        for patch in _load_all(folder / entry["path"]):
            matches = [doc for doc in docs if _key(doc) == _key(patch)]
            assert len(matches) == 1, f"{folder}: patch target {_key(patch)} not found once"
            if patch.get("$patch") == "delete":
                docs.remove(matches[0])
            else:
                body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
                _merge(matches[0], body)
    for image in kustomization.get("images", []):
        for doc in docs:
            for container in _pod_containers(doc):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    new_name = image.get("newName", name)
                    container["image"] = f"{new_name}:{image.get('newTag', tag)}"
    return docs


def target_kustomization(name: str) -> tuple[Path, dict[str, Any] | None]:
    """Where target `name` is rendered from: a folder, or (a component on the base) a
    kustomization as if it were in deploy/kubernetes."""
    if name == "base":
        return KUBE / "base", None
    if name in OVERLAYS:
        return KUBE / "overlays" / name, None
    component = name.removeprefix("base+")
    return KUBE, {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["base"],
        "components": [f"components/{component}"],
    }


def render_target(name: str) -> list[dict[str, Any]]:
    return render(*target_kustomization(name))


@pytest.fixture(scope="module", params=TARGETS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    """(target name, its resources) for each of TARGETS."""
    return request.param, render_target(request.param)


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in docs if _key(doc) == (kind, name)]
    assert len(found) == 1, (kind, name)
    return found[0]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    found = [doc for doc in docs if _key(doc) == (kind, name)]
    return found[0] if found else None


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = one(docs, "Deployment", "rnnserve")["spec"]["template"][
        "spec"
    ]["containers"]
    return containers[0]


def settings_of(docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings the pod builds: its ConfigMap and env as environment variables."""
    env = dict(one(docs, "ConfigMap", "rnnserve-settings")["data"])
    env |= {e["name"]: e["value"] for e in server_container(docs).get("env", []) if "value" in e}
    for name in [n for n in os.environ if n.startswith("RNNSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return Settings()


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- schemas ------------------------------------------------------------------------------
def test_every_overlay_and_component_is_listed() -> None:
    assert set(OVERLAYS) >= {"cpu", "gpu", "dev", "external-redis", "prometheus-operator"}
    assert set(COMPONENTS) == {"monitoring", "alerts", "autoscaling-custom-metrics"}
    opted = yaml.safe_load((KUBE / "overlays/prometheus-operator/kustomization.yaml").read_text())
    assert sorted(opted["components"]) == [f"../../components/{c}" for c in COMPONENTS]
    for component in COMPONENTS:
        kustomization = yaml.safe_load(
            (KUBE / "components" / component / "kustomization.yaml").read_text()
        )
        assert kustomization["kind"] == "Component"
        assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on the PATH")
@pytest.mark.parametrize("name", TARGETS)
def test_real_kustomize_renders_every_target_as_the_subset_does(name: str, tmp_path: Path) -> None:
    # kubectl 1.32 bundles kustomize v5.5, which panics on a patch file holding several
    # `$patch: delete` documents: the Python subset alone could not catch that.
    folder, kustomization = target_kustomization(name)
    if kustomization is not None:  # kustomize takes relative paths only
        written = {
            **kustomization,
            "resources": [
                os.path.relpath(folder / r, tmp_path) for r in kustomization["resources"]
            ],
            "components": [
                os.path.relpath(folder / c, tmp_path) for c in kustomization["components"]
            ],
        }
        (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(written))
    done = subprocess.run(
        ["kubectl", "kustomize", str(folder if kustomization is None else tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    real = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    ours = render_target(name)
    assert sorted(map(_key, real)) == sorted(map(_key, ours))
    for doc in real:  # the same content, not only the same names
        assert _normalized(doc) == _normalized(one(ours, *_key(doc))), _key(doc)


def _normalized(doc: dict[str, Any]) -> Any:
    """A rendered resource as JSON with strings for scalars (kustomize quotes some)."""
    return json.loads(json.dumps(doc, sort_keys=True, default=str), parse_int=str)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_resource_validates_against_the_kubernetes_schemas(overlay, version) -> None:
    name, docs = overlay
    keys = [_key(doc) for doc in docs]
    assert len(keys) == len(set(keys)), f"{name}: duplicate resources"
    for doc in docs:
        if doc["kind"] in CRDS.get(doc["apiVersion"], set()):
            continue  # not in the core schemas: test_monitoring_resources checks them
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_add_ons_only_where_opted_into(overlay) -> None:
    """Without a component, nothing needs a CRD or a custom metrics API: the base and
    the plain overlays apply on any cluster (the HPA scales on CPU, metrics-server)."""
    name, docs = overlay
    kinds = {doc["kind"] for doc in docs}
    assert ("ServiceMonitor" in kinds) == (name in WITH_COMPONENT["monitoring"])
    assert ("PrometheusRule" in kinds) == (name in WITH_COMPONENT["alerts"])
    hpa = find(docs, "HorizontalPodAutoscaler", "rnnserve")
    types = {m["type"] for m in hpa["spec"]["metrics"]} if hpa is not None else set()
    if name in WITH_COMPONENT["autoscaling-custom-metrics"]:
        assert types == {"Resource", "Pods"}
    elif hpa is not None:
        assert types == {"Resource"}
    crds = {kind for kinds_ in CRDS.values() for kind in kinds_}
    if not any(name in opted for opted in WITH_COMPONENT.values()):
        assert not kinds & crds


def test_no_secret_is_shipped(overlay) -> None:
    """`apply -k` must never overwrite the operator's tokens (or TLS keys) with a
    placeholder: the Secrets are created by hand, as docs/deployment.md says."""
    name, docs = overlay
    assert not [doc for doc in docs if doc["kind"] == "Secret"]
    volumes = {
        v["name"]: v
        for v in one(docs, "Deployment", "rnnserve")["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes["auth"]["secret"]["secretName"] == "rnnserve-auth"
    # the pods wait for the tokens, except in dev, which runs without auth
    assert volumes["auth"]["secret"].get("optional", False) == (name == "dev")
    assert volumes["tls"]["secret"] == {"secretName": "rnnserve-tls", "optional": True}
    docs_text = (ROOT / "docs" / "deployment.md").read_text()
    assert (
        "kubectl -n rnnserve create secret generic rnnserve-auth --from-file=tokens=" in docs_text
    )
    assert "kubectl -n rnnserve create secret tls rnnserve-tls" in docs_text


def test_monitoring_resources() -> None:
    docs = render_target("prometheus-operator")
    names = metric_names()
    monitor = one(docs, "ServiceMonitor", "rnnserve")
    service = one(docs, "Service", "rnnserve")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    # only the one Service: the headless one would scrape every pod twice
    services = [d for d in docs if d["kind"] == "Service"]
    scraped = [
        s
        for s in services
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert scraped == [service]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    rule = one(docs, "PrometheusRule", "rnnserve")
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert {r["alert"] for r in alerts} >= {
        "RnnserveHighErrorRate",
        "RnnserveHighStepLatencyP99",
        "RnnserveStoreErrors",
        "RnnserveQueueSaturation",
    }
    for group in rule["spec"]["groups"]:
        assert isinstance(group["name"], str) and group["rules"]
    for alert in alerts:
        assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}, alert
        assert re.fullmatch(r"\d+[smh]", alert["for"])
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description"} <= set(alert["annotations"])
        check_promql(alert["expr"], names)


# -- what the manifests say matches the code ------------------------------------------
def test_settings_env_names_are_real_settings_fields(overlay, monkeypatch) -> None:
    _, docs = overlay
    fields = {f"RNNSERVE_{name.upper()}" for name in Settings.model_fields}
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "rnnserve-settings":
            assert set(doc["data"]) <= fields, set(doc["data"]) - fields
        for container in _pod_containers(doc):
            for env in container.get("env", []):
                if env["name"].startswith("RNNSERVE_"):
                    assert env["name"] in fields, env["name"]
    settings_of(docs, monkeypatch)  # and every value parses


def test_ports_and_probes_are_the_servers(overlay, monkeypatch) -> None:
    _, docs = overlay
    settings = settings_of(docs, monkeypatch)
    container = server_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}
    # the services the server reports health for (server.py sets them all)
    health_names = {"", NATIVE_SERVICE, KSERVE_SERVICE}
    assert HEALTH_SERVICE in SERVICES
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = container[probe]["grpc"]
        assert grpc["port"] == settings.port, probe
        assert grpc.get("service", "") in health_names, probe
    # the startup probe covers model loading and warm-up: minutes, not seconds
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    for service in (d for d in docs if d["kind"] == "Service"):
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            if service["metadata"]["name"].startswith("rnnserve-redis"):
                continue
            assert target in ports and port["port"] == ports[target], port


def test_termination_grace_covers_the_prestop_and_the_drain(overlay, monkeypatch) -> None:
    _, docs = overlay
    settings = settings_of(docs, monkeypatch)
    pod = one(docs, "Deployment", "rnnserve")["spec"]["template"]["spec"]
    command = server_container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + settings.grace_period_s


def test_pods_are_non_root_with_read_only_roots_and_writable_mounts(overlay, monkeypatch) -> None:
    _, docs = overlay
    settings = settings_of(docs, monkeypatch)
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (uid,) = re.findall(r"^USER (\d+)", dockerfile, re.M)
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for container in _pod_containers(doc):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert "memory" in container["resources"]["limits"]
    deployment = one(docs, "Deployment", "rnnserve")
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)
    container = server_container(docs)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}

    def volume_at(path: Path) -> dict[str, Any]:
        for mount_path, mount in mounts.items():
            if path == Path(mount_path) or Path(mount_path) in path.parents:
                volume: dict[str, Any] = volumes[mount["name"]]
                return volume
        raise AssertionError(f"{path} is on the read-only root filesystem")

    env = {e["name"]: e["value"] for e in container["env"]}
    assert "emptyDir" in volume_at(Path(env["PROMETHEUS_MULTIPROC_DIR"]))
    assert "emptyDir" in volume_at(Path("/tmp"))
    volume_at(settings.model_repository)
    if settings.auth_tokens_file is not None:
        assert "secret" in volume_at(settings.auth_tokens_file)


def test_selectors_hpa_pdb_and_network_policies(overlay, monkeypatch) -> None:
    name, docs = overlay
    settings = settings_of(docs, monkeypatch)
    deployment = one(docs, "Deployment", "rnnserve")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    for service_name in ("rnnserve", "rnnserve-headless"):
        assert selects(one(docs, "Service", service_name)["spec"]["selector"], pod_labels)
    assert one(docs, "Service", "rnnserve-headless")["spec"]["clusterIP"] == "None"
    hpa = find(docs, "HorizontalPodAutoscaler", "rnnserve")
    if hpa is not None:
        assert hpa["spec"]["scaleTargetRef"]["name"] == "rnnserve"
        custom = [
            m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
        ]
        assert set(custom) <= set(metric_names())
    else:
        assert name == "dev"
    pdb = find(docs, "PodDisruptionBudget", "rnnserve")
    assert pdb is None or selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    redis = find(docs, "StatefulSet", "rnnserve-redis")
    if redis is None:  # an existing Redis: the URL is the operator's
        assert name == "external-redis"
        assert settings.redis_url and not settings.redis_url.startswith("redis://rnnserve-redis")
        return
    redis_pod = redis["spec"]["template"]
    policy = one(docs, "NetworkPolicy", "rnnserve-redis")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], redis_pod["metadata"]["labels"])
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert selects(source["podSelector"]["matchLabels"], pod_labels)
    assert not selects(source["podSelector"]["matchLabels"], redis_pod["metadata"]["labels"])
    (redis_port,) = redis_pod["spec"]["containers"][0]["ports"]
    assert [p["port"] for p in rule["ports"]] == [redis_port["containerPort"]]
    # the URL names the StatefulSet's first pod through its governing Service
    host = f"{redis['metadata']['name']}-0.{redis['spec']['serviceName']}"
    assert settings.redis_url == f"redis://{host}:{redis_port['containerPort']}/0"
    assert one(docs, "Service", redis["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    config = one(docs, "ConfigMap", "rnnserve-redis")["data"]["redis.conf"]
    assert "appendonly yes" in config and "maxmemory-policy noeviction" in config


def _millicpus(quantity: str) -> int:
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


def _bytes(quantity: str) -> int:
    """Kubernetes (`4Gi`, `512Mi`) or Redis (`2gb`, `256mb`: also powers of 1024)."""
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    scale = {"": 1, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "kb": 1 << 10, "mb": 1 << 20,
             "gb": 1 << 30}  # fmt: skip
    return int(number) * scale[unit.lower()]


def _documented_threads() -> dict[str, tuple[str, int]]:
    """docs/deployment.md's table: manifests -> (CPU limit, compute threads)."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    rows = re.findall(r"^ *\| `(?:overlays/)?([a-z-]+)` \| `([0-9.m]+)` \| (\d+) \|", text, re.M)
    return {name: (cpu, int(threads)) for name, cpu, threads in rows}


def test_cpu_limit_equals_request_and_compute_threads_are_the_documented_ones(
    overlay, monkeypatch, tmp_path
) -> None:
    """RNNSERVE_COMPUTE_THREADS=0 reads the pod's CPU limit from the cgroup: with no limit
    it would be the node's cores - 1. The kubelet writes the limit as cpu.max (quota per
    100 ms period); the server's own functions turn it into threads on a 64-core node."""
    name, docs = overlay
    container = server_container(docs)
    resources = container["resources"]
    assert resources["limits"]["cpu"] == resources["requests"]["cpu"], name
    settings = settings_of(docs, monkeypatch)
    assert settings.compute_threads == 0 and settings.processes == 1
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(f"{_millicpus(resources['limits']['cpu']) * 100} 100000\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    threads = auto_compute_threads(available_cpus(cpu_max))
    documented = _documented_threads()
    key = "base" if name.startswith("base") else name
    assert documented[key] == (resources["limits"]["cpu"], threads), name
    assert threads == (1 if key in ("base", "dev") else 3)


def test_redis_maxmemory_is_half_its_memory_limit(overlay) -> None:
    """The AOF rewrite forks: copy-on-write can double Redis's footprint while it runs."""
    name, docs = overlay
    redis = find(docs, "StatefulSet", "rnnserve-redis")
    if redis is None:
        assert name == "external-redis"
        return
    config = one(docs, "ConfigMap", "rnnserve-redis")["data"]["redis.conf"]
    (maxmemory,) = re.findall(r"^maxmemory (\S+)$", config, re.M)
    limit = redis["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert 0.4 <= _bytes(maxmemory) / _bytes(limit) <= 0.5, (maxmemory, limit)


def test_gpu_only_in_the_gpu_overlay(overlay) -> None:
    name, docs = overlay
    resources = server_container(docs)["resources"]
    gpus = resources["limits"].get("nvidia.com/gpu")
    assert (gpus == "1") == (name == "gpu")
    image = server_container(docs)["image"]
    assert image.endswith("-gpu") == (name == "gpu")


# -- PromQL in alerts and the dashboard -----------------------------------------------------
_METHOD = re.compile(r"/([A-Za-z0-9_.]+)/([A-Za-z0-9_]*)")


def _grpc_methods() -> set[str]:
    from rnnserve.protocol.inference import grpc_service_pb2
    from rnnserve.protocol.rnnserve.v1 import recurrent_pb2

    methods = set()
    for descriptor in (recurrent_pb2.DESCRIPTOR, grpc_service_pb2.DESCRIPTOR):
        for service in descriptor.services_by_name.values():
            methods |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    return methods


def check_promql(expr: str, names: dict[str, str]) -> None:
    used = set(re.findall(r"\brnnserve_[a-z0-9_]+", expr))
    assert used, expr
    assert used <= set(names), used - set(names)
    for matchers in re.findall(r"rnnserve_[a-z0-9_]+\{([^}]*)\}", expr):
        labels = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", matchers))
        assert labels <= METRIC_LABELS | TARGET_LABELS, labels
    for grouping in re.findall(r"\bby \(([^)]*)\)", expr):
        labels = {label.strip() for label in grouping.split(",")}
        assert labels <= METRIC_LABELS | TARGET_LABELS, labels
    methods = _grpc_methods()
    for service, method in _METHOD.findall(expr):
        assert service in SERVICES, service
        if method:
            assert f"/{service}/{method}" in methods, method


def test_dashboard_queries_use_only_declared_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "rnnserve-dashboard.json").read_text())
    names = metric_names()
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        check_promql(expr.replace("$__rate_interval", "5m"), names)
    # every family of the server is on the dashboard, except `_created` timestamps
    shown = {name for expr in exprs for name in re.findall(r"rnnserve_[a-z0-9_]+", expr)}
    families = {re.sub(r"_(bucket|sum|count|created|total)$", "", n) for n in names}
    shown_families = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in shown}
    assert families <= shown_families, families - shown_families
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_filters_by_model_and_shows_no_mean_since_start() -> None:
    """The model variable filters every panel whose metric has a `model` label (calls
    too), and a histogram's `_sum`/`_count` appear only under rate(): `_sum / _count`
    alone is a mean since the process started, not what happens now."""
    dashboard = json.loads((DEPLOY / "grafana" / "rnnserve-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    with_model = {
        name
        for metric in METRICS
        if "model" in metric._labelnames
        for name in metric_names()
        if name.startswith(metric._name)
    }
    assert "rnnserve_requests_total" in with_model
    for expr in exprs:
        for name, matchers in re.findall(r"(rnnserve_[a-z0-9_]+)\{([^}]*)\}", expr):
            if name in with_model:
                assert 'model=~"$model"' in matchers, (name, expr)
        for name in re.findall(r"rnnserve_[a-z0-9_]+_(?:sum|count)\b", expr):
            assert re.search(rf"(?:rate|increase)\({name}\b", expr), (name, expr)


# -- the images -----------------------------------------------------------------------------
def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return [tuple(line.split(None, 1)) for line in lines if not line.startswith("#")]  # type: ignore[misc]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_shape(name: str) -> None:
    steps = _instructions(DEPLOY / name)
    assert steps[0] == ("FROM", "python:3.11-slim")
    entrypoint = [json.loads(arg) for op, arg in steps if op == "ENTRYPOINT"]
    assert entrypoint == [["rnnserve", "serve"]]
    for op, arg in steps:
        if op == "COPY":
            *sources, _ = arg.split()
            for source in sources:
                assert (ROOT / source).exists(), source
    (expose,) = [arg for op, arg in steps if op == "EXPOSE"]
    assert int(expose.split()[0]) == Settings.model_fields["port"].default
    assert [op for op, _ in steps].index("USER") > [op for op, _ in steps].index("RUN")


def test_dockerfile_install_line_resolves_with_the_constraints() -> None:
    """The image's `pip install -c constraints.txt ".[server]"`, as a dry run against what this
    environment holds (offline): the pins and the package's requirements agree."""
    runs = [arg for op, arg in _instructions(DEPLOY / "Dockerfile") if op == "RUN"]
    install = next(r for r in runs if r.startswith("pip install")).split("&&")[0]
    args = shlex.split(install)[2:]
    assert args == ["-c", "constraints.txt", ".[server]"]  # the server, not the client only
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "--no-build-isolation",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Would install rnnserve-" in result.stdout
    check = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout


def test_entrypoint_runs() -> None:
    """`rnnserve serve` is the console script the image calls; --help parses every flag."""
    script = Path(sys.executable).parent / "rnnserve"
    result = subprocess.run(
        [str(script), "serve", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--metrics-port" in result.stdout and "--grace-period-s" in result.stdout
