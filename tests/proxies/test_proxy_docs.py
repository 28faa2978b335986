"""The configurations that cannot run here (Envoy, Contour) are checked against what they must
fit: Envoy's own protos (``xds-protos``) and sessiond's k8s Service. And ``docs/proxies.md``
shows every file of ``docs/proxies/`` as it is, so what the docs say is what the tests run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import envoy.extensions.filters.http.ext_authz.v3.ext_authz_pb2 as ext_authz_pb2
import envoy.extensions.filters.http.router.v3.router_pb2
import envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2
import envoy.extensions.upstreams.http.v3.http_protocol_options_pb2
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import json_format

from api.grpc_authz import SERVICE
from tests.conftest import ROOT

DOCS = ROOT / "docs" / "proxies"


def k8s_grpc_port() -> tuple[str, int]:
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "base" / "api.yaml").read_text()))
    (service,) = [d for d in docs if d["kind"] == "Service"]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    return service["metadata"]["name"], int(port["port"])


def test_envoy_configuration_is_valid_and_fails_closed() -> None:
    # Given the documented Envoy configuration, read with Envoy's own messages (unknown field
    # names or types are refused)
    doc = yaml.safe_load((DOCS / "envoy.yaml").read_text())
    bootstrap = json_format.ParseDict(doc, bootstrap_pb2.Bootstrap())
    (listener,) = bootstrap.static_resources.listeners
    manager = envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2.HttpConnectionManager()  # noqa: E501
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    authz = ext_authz_pb2.ExtAuthz()
    assert manager.http_filters[0].typed_config.Unpack(authz)
    assert manager.http_filters[-1].name == "envoy.filters.http.router"
    # Then ext_authz asks the sessiond cluster over gRPC and never lets a request through
    # when sessiond cannot decide
    assert authz.grpc_service.envoy_grpc.cluster_name == "sessiond"
    assert authz.failure_mode_allow is False
    assert authz.status_on_error.code == 503
    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    sessiond = clusters["sessiond"]
    # Over HTTP/2, to the Service's grpc port, health-checked with grpc.health.v1
    assert "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" in (
        sessiond.typed_extension_protocol_options
    )
    address = sessiond.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert address.socket_address.port_value == k8s_grpc_port()[1]
    assert sessiond.health_checks[0].grpc_health_check.service_name == SERVICE


def test_contour_extension_service_fits_the_k8s_service() -> None:
    docs: list[dict[str, Any]] = list(yaml.safe_load_all((DOCS / "contour.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs}
    extension, proxy = by_kind["ExtensionService"], by_kind["HTTPProxy"]
    assert extension["apiVersion"] == "projectcontour.io/v1alpha1"
    assert extension["spec"]["protocol"] == "h2c"  # Contour speaks only gRPC to it
    (service,) = extension["spec"]["services"]
    assert (service["name"], service["port"]) == k8s_grpc_port()
    auth = proxy["spec"]["virtualhost"]["authorization"]
    assert auth["extensionRef"] == {
        "name": extension["metadata"]["name"],
        "namespace": extension["metadata"]["namespace"],
    }
    assert auth["failOpen"] is False
    assert proxy["spec"]["virtualhost"]["tls"]  # Contour requires TLS for authorization


def test_the_docs_show_each_file_as_it_is() -> None:
    # Given docs/proxies.md, where each configuration follows a marker naming its file
    page = (ROOT / "docs" / "proxies.md").read_text()
    shown = dict(re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", page, re.S))
    # Then every file of docs/proxies/ is shown, byte for byte
    files = sorted(str(p.relative_to(ROOT)) for p in DOCS.iterdir() if p.is_file())
    assert sorted(shown) == files
    for name, text in shown.items():
        assert text == Path(ROOT / name).read_text(), name
