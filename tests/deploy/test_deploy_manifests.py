"""The kustomize overlays render, validate against the Kubernetes schemas and follow our rules."""

from __future__ import annotations

import base64
import configparser
import datetime as dt
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
from cryptography import x509

from sessiond.config import Settings

from ._support import (
    K8S,
    KUBECTL,
    KUBECTL_MIN,
    REPO,
    Doc,
    find,
    is_sessiond,
    kubectl_version,
    kustomize,
    pod_spec,
    workloads,
)

pytestmark = pytest.mark.deploy

K8S_VERSION = "1.30.0"
SESSIOND_WORKLOADS = {
    ("Deployment", "sessiond-api"),
    ("Deployment", "sessiond-worker"),
    ("Deployment", "sessiond-scheduler"),
    ("Job", "sessiond-migrate"),
}
SECRET_ENV = {
    "SESSIOND_JWT_SECRET",
    "SESSIOND_DATABASE_URL",
    "SESSIOND_AMQP_URL",
    "SESSIOND_REDIS_URL",
}
RENDERINGS = ["dev", "prod", "dev+keda", "prod+keda"]


def _containers(spec: Doc) -> list[Doc]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def _sessiond_env(docs: list[Doc], spec: Doc, container: Doc) -> dict[str, Doc]:
    """Every env var a sessiond container sees: envFrom ConfigMaps resolved, then env."""
    env: dict[str, Doc] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"{container['name']}: only ConfigMaps via envFrom"
        config_map = find(docs, "ConfigMap", source["configMapRef"]["name"])
        for key, value in config_map["data"].items():
            env[key] = {"name": key, "value": value}
    for item in container.get("env", []):
        env[item["name"]] = item
    return env


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_object_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[Doc]], name: str
) -> None:
    # Given one rendering; When each object is validated offline (CRDs have no schema there)
    errors: list[str] = []
    for doc in rendered[name]:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # shape checked by hand in test_keda_component_shape
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {exc.path}")
    # Then nothing is rejected
    assert errors == []


@pytest.mark.parametrize("name", RENDERINGS)
def test_sessiond_workloads_are_all_there(rendered: dict[str, list[Doc]], name: str) -> None:
    found = {
        (d["kind"], d["metadata"]["name"]) for d, _ in workloads(rendered[name]) if is_sessiond(d)
    }
    assert found == SESSIOND_WORKLOADS


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_api_probes_hit_the_health_routes(rendered: dict[str, list[Doc]], name: str) -> None:
    docs = rendered[name]
    api = find(docs, "Deployment", "sessiond-api")
    (container,) = api["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    def target(probe: str) -> tuple[str, int]:
        get = container[probe]["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    assert target("livenessProbe") == ("/health/live", 8000)
    assert target("startupProbe") == ("/health/live", 8000)
    assert target("readinessProbe") == ("/health/ready", 8000)
    # the process listens where the probes knock
    args: list[str] = container["args"]
    assert args[0] == "api"
    assert args[args.index("--port") + 1] == "8000"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    # and the Service sends traffic there too
    service = find(docs, "Service", "sessiond-api")
    assert (
        service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    )
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http", "grpc"]


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_grpc_port_is_served_and_exposed(rendered: dict[str, list[Doc]], name: str) -> None:
    # Given the rendered overlay: the ConfigMap's SESSIOND_GRPC_PORT is the container's "grpc"
    docs = rendered[name]
    config = find(docs, "ConfigMap", "sessiond-config")["data"]
    api = find(docs, "Deployment", "sessiond-api")
    (container,) = api["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(config["SESSIOND_GRPC_PORT"]) == ports["grpc"]
    assert Settings.model_validate({"grpc_port": config["SESSIOND_GRPC_PORT"]}).grpc_port
    # And the Service exposes it as cleartext HTTP/2, which ext_authz clients speak
    service = find(docs, "Service", "sessiond-api")
    (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert (grpc["targetPort"], grpc["appProtocol"]) == ("grpc", "kubernetes.io/h2c")


def test_probed_routes_are_declared_by_the_api() -> None:
    # Given the API source; Then both probe routes are declared (full path, or prefix + route)
    sources = [p.read_text() for p in (REPO / "api").rglob("*.py")]

    def declared(path: str) -> bool:
        prefix, leaf = path.rsplit("/", 1)
        return any(path in s or (f'"{prefix}"' in s and f'"/{leaf}"' in s) for s in sources)

    assert declared("/health/live"), "no /health/live route found under api/"
    assert declared("/health/ready"), "no /health/ready route found under api/"


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_every_container_is_unprivileged_and_bounded(
    rendered: dict[str, list[Doc]], name: str
) -> None:
    problems: list[str] = []
    for doc, spec in workloads(rendered[name]):
        pod_sc = spec.get("securityContext", {})
        for c in _containers(spec):
            where = f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}"
            sc = {**pod_sc, **c.get("securityContext", {})}
            if sc.get("runAsNonRoot") is not True or sc.get("runAsUser", 0) == 0:
                problems.append(f"{where}: may run as root")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: privilege escalation allowed")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: capabilities not dropped")
            if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: no RuntimeDefault seccomp profile")
            for bound in ("requests", "limits"):
                if set(c.get("resources", {}).get(bound, {})) != {"cpu", "memory"}:
                    problems.append(f"{where}: {bound} must set cpu and memory")
    assert problems == []


def test_sessiond_root_filesystem_read_only_except_for_tilt(
    dev_docs: list[Doc], prod_docs: list[Doc]
) -> None:
    # prod: read-only; dev: writable only because Tilt's live_update syncs files into it
    for docs, expected in ((prod_docs, True), (dev_docs, False)):
        for doc, spec in workloads(docs):
            if is_sessiond(doc):
                for c in _containers(spec):
                    assert c["securityContext"]["readOnlyRootFilesystem"] is expected
                    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_env_names_are_settings_fields(rendered: dict[str, list[Doc]], name: str) -> None:
    # Given every variable reaching a sessiond container (ConfigMaps included)
    docs = rendered[name]
    fields = set(Settings.model_fields)
    for doc, spec in workloads(docs):
        if not is_sessiond(doc):
            continue
        for c in _containers(spec):
            env = _sessiond_env(docs, spec, c)
            # Then each one is SESSIOND_<field> of sessiond.config.Settings
            for env_name in env:
                assert env_name.startswith("SESSIOND_"), f"{c['name']}: {env_name}"
                assert env_name.removeprefix("SESSIOND_").lower() in fields, (
                    f"{doc['metadata']['name']}: {env_name} is not a Settings field"
                )
            # and secrets only ever come from a Secret, never from a literal or a ConfigMap
            for secret in SECRET_ENV & env.keys():
                assert set(env[secret]) == {"name", "valueFrom"}, f"{secret} must be a secretKeyRef"
                assert "secretKeyRef" in env[secret]["valueFrom"]
            # production refuses the placeholder JWT secret: every process needs the real one
            assert "SESSIOND_JWT_SECRET" in env, f"{doc['metadata']['name']} lacks the JWT secret"


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_settings_values_in_configmaps_are_accepted(
    rendered: dict[str, list[Doc]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the ConfigMap values plus stand-ins for the secrets; Then Settings accepts them
    config = find(rendered[name], "ConfigMap", _config_map_name(rendered[name]))
    for key, value in config["data"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SESSIOND_JWT_SECRET", "x" * 40)
    settings = Settings()
    assert settings.api_host == "0.0.0.0"
    assert settings.env == ("development" if name == "dev" else "production")


def _config_map_name(docs: list[Doc]) -> str:
    (name,) = [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("sessiond-config")
    ]
    return str(name)


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_secret_keys_and_file_settings_resolve(rendered: dict[str, list[Doc]], name: str) -> None:
    docs = rendered[name]
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    for doc, spec in workloads(docs):
        if not is_sessiond(doc):
            continue
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in _containers(spec):
            mounts = [PurePosixPath(m["mountPath"]) for m in c.get("volumeMounts", [])]
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes
            for key, item in _sessiond_env(docs, spec, c).items():
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref and name == "dev":  # prod's Secret is provisioned out of band
                    data = {**secrets[ref["name"]].get("data", {})}
                    assert ref["key"] in data, f"{key}: no key {ref['key']} in {ref['name']}"
                if key.endswith("_FILE") and "value" in item:
                    path = PurePosixPath(item["value"])
                    assert any(m in path.parents for m in mounts), f"{key}={path} is not mounted"


def test_secrets_only_in_dev_and_obviously_fake(dev_docs: list[Doc], prod_docs: list[Doc]) -> None:
    assert [d for d in prod_docs if d["kind"] == "Secret"] == []
    assert [d for d in kustomize_base() if d["kind"] == "Secret"] == []
    secret = _decoded(dev_docs, "sessiond-secrets")
    assert set(secret) == {"jwt-secret", "database-url", "amqp-url", "redis-url"}
    assert "dev-only" in secret["jwt-secret"]


def kustomize_base() -> list[Doc]:

    return kustomize(K8S / "base")


def _decoded(docs: list[Doc], prefix: str) -> dict[str, str]:
    (secret,) = [
        d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith(prefix + "-")
    ]
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_dev_credentials_agree_between_services(dev_docs: list[Doc]) -> None:
    # Given the URLs sessiond uses and the servers' own configuration
    urls = _decoded(dev_docs, "sessiond-secrets")
    amqp, db = urlsplit(urls["amqp-url"]), urlsplit(urls["database-url"])
    parser = configparser.ConfigParser()
    parser.read_string("[rabbitmq]\n" + (K8S / "overlays/dev/rabbitmq.conf").read_text())
    conf = parser["rabbitmq"]
    # Then RabbitMQ: TLS only, same user, password and vhost
    assert amqp.scheme == "amqps" and amqp.port == 5671
    assert conf["listeners.tcp"] == "none" and conf["listeners.ssl.default"] == "5671"
    assert (amqp.username, amqp.password) == (conf["default_user"], conf["default_pass"])
    assert amqp.path.lstrip("/") == conf["default_vhost"]
    # and PostgreSQL: same password, user and database as the StatefulSet's
    postgres = find(dev_docs, "StatefulSet", "postgres")
    env = {e["name"]: e for e in postgres["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert db.username == env["POSTGRES_USER"]["value"]
    assert db.path.lstrip("/") == env["POSTGRES_DB"]["value"]
    assert db.password == _decoded(dev_docs, "postgres-credentials")["password"]
    # and every host is a Service of the overlay
    services = {d["metadata"]["name"]: d for d in dev_docs if d["kind"] == "Service"}
    for url in (urlsplit(v) for k, v in urls.items() if k != "jwt-secret"):
        assert url.hostname in services, url.hostname
        ports = {p["port"] for p in services[url.hostname]["spec"]["ports"]}
        assert url.port in ports


def test_dev_broker_certificate_is_trusted_by_sessiond() -> None:
    # Given the CA sessiond mounts and the broker's certificate
    tls = K8S / "overlays/dev/rabbitmq-tls"
    ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tls / "tls.crt").read_bytes())
    # Then the CA signed it, it names the Service host, and it is valid for a while yet
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "rabbitmq" in san.get_values_for_type(x509.DNSName)
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
    assert cert.not_valid_after_utc > soon and ca.not_valid_after_utc > soon
    assert not (tls / "ca.key").exists(), "the dev CA key must not be kept"


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_one_image_for_every_sessiond_process(rendered: dict[str, list[Doc]], name: str) -> None:
    images = {
        c["image"]
        for doc, spec in workloads(rendered[name])
        if is_sessiond(doc)
        for c in _containers(spec)
    }
    assert len(images) == 1, images
    (image,) = images
    if name == "dev":
        assert image == "sessiond"  # the ref Tilt's docker_build replaces
    else:
        assert re.fullmatch(r"[\w.-]+(:\d+)?/[\w./-]+(:[\w.-]+|@sha256:[0-9a-f]{64})", image), image
        assert not image.endswith(":latest")


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_graceful_shutdown_budget(rendered: dict[str, list[Doc]], name: str) -> None:
    docs = rendered[name]
    worker = find(docs, "Deployment", "sessiond-worker")["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= 60
    api = find(docs, "Deployment", "sessiond-api")["spec"]["template"]["spec"]
    (sleep, seconds) = api["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    # the drain pause plus Sanic's 15 s graceful shutdown fit in the grace period
    assert api["terminationGracePeriodSeconds"] >= int(seconds) + 15 + 5


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_scaling_objects_target_what_exists(rendered: dict[str, list[Doc]], name: str) -> None:
    docs = rendered[name]
    api = find(docs, "Deployment", "sessiond-api")
    assert "replicas" not in api["spec"], "the HPA owns the api replica count"
    hpa = find(docs, "HorizontalPodAutoscaler", "sessiond-api")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "sessiond-api",
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        target = find(docs, "Deployment", pdb["metadata"]["name"])
        selector: dict[str, str] = pdb["spec"]["selector"]["matchLabels"]
        assert selector.items() <= target["spec"]["template"]["metadata"]["labels"].items()
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"} == {
        "sessiond-api",
        "sessiond-worker",
    }
    scheduler = find(docs, "Deployment", "sessiond-scheduler")["spec"]
    assert scheduler["replicas"] == 1 and scheduler["strategy"]["type"] == "Recreate"


def test_prod_runs_more_than_dev(dev_docs: list[Doc], prod_docs: list[Doc]) -> None:
    def replicas(docs: list[Doc]) -> tuple[int, int]:
        hpa = find(docs, "HorizontalPodAutoscaler", "sessiond-api")["spec"]["minReplicas"]
        return hpa, find(docs, "Deployment", "sessiond-worker")["spec"]["replicas"]

    assert replicas(dev_docs) == (1, 1)
    prod_api, prod_worker = replicas(prod_docs)
    assert prod_api >= 3 and prod_worker >= 3
    # prod talks to managed services only: no broker, cache or database of its own
    assert {d["kind"] for d in prod_docs} & {"StatefulSet"} == set()
    assert {d["metadata"]["name"] for d in prod_docs if d["kind"] == "Service"} == {"sessiond-api"}


@pytest.mark.parametrize("name", ["dev+keda", "prod+keda"])
def test_keda_component_shape(rendered: dict[str, list[Doc]], name: str) -> None:
    # KEDA's CRDs are not in the offline schemas: check what KEDA itself would check.
    docs = rendered[name]
    scaled: Any = find(docs, "ScaledObject", "sessiond-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "sessiond-worker")
    assert "replicas" not in find(docs, "Deployment", "sessiond-worker")["spec"]
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    meta = trigger["metadata"]
    assert meta["mode"] == "QueueLength" and meta["protocol"] == "amqp"
    assert meta["queueName"] == Settings.model_fields["ingest_queue"].default
    assert isinstance(meta["value"], str) and int(meta["value"]) > 0
    auth: Any = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host" and ref["key"] == "amqp-url"
    # the same (possibly hash-suffixed) Secret the workers read their AMQP URL from
    worker = find(docs, "Deployment", "sessiond-worker")
    worker_spec = pod_spec(worker)
    assert worker_spec is not None
    (amqp,) = [e for e in worker_spec["containers"][0]["env"] if e["name"] == "SESSIOND_AMQP_URL"]
    assert amqp["valueFrom"]["secretKeyRef"] == {"name": ref["name"], "key": ref["key"]}


def test_kubectl_is_the_projects_own() -> None:
    # Given the kubectl the deploy checks render with, then it is the one installed with the
    # project (next to this Python), recent enough for k8s/ — never the machine's /usr/bin one
    assert KUBECTL.parent == Path(sys.executable).parent
    assert KUBECTL.resolve() != Path("/usr/bin/kubectl").resolve()
    assert kubectl_version() >= KUBECTL_MIN
