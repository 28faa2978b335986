"""The Tiltfile parses and, run against a recording stand-in for Tilt's API, does what we mean."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import starlark  # type: ignore[import-untyped]  # PyPI starlark-pyo3

from ._support import K8S, REPO, Doc, workloads

pytestmark = pytest.mark.deploy

SOURCE_DIRS = ["actors", "api", "storage", "sessiond"]
TILT_FUNCTIONS = [
    "version_settings",
    "docker_build",
    "sync",
    "run",
    "k8s_yaml",
    "kustomize",
    "k8s_resource",
    "port_forward",
    "local_resource",
]


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class Tilt:
    """What the Tiltfile asked Tilt to do, in order."""

    calls: list[Call] = field(default_factory=list)
    files_read: list[str] = field(default_factory=list)

    def named(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]

    def resource(self, name: str) -> Call:
        (call,) = [c for c in self.named("k8s_resource") if c.args[0] == name]
        return call


def _evaluate() -> Tilt:
    source = (REPO / "Tiltfile").read_text()
    ast = starlark.parse("Tiltfile", source, starlark.Dialect.extended())
    tilt = Tilt()
    module = starlark.Module()

    def recorder(name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            call = Call(name, args, kwargs)
            tilt.calls.append(call)
            return starlark.OpaquePythonObject(call)

        return record

    def read_file(path: str) -> str:
        tilt.files_read.append(path)
        return (REPO / path).read_text()

    for name in TILT_FUNCTIONS:
        module.add_callable(name, recorder(name))
    module.add_callable("read_file", read_file)
    module["TRIGGER_MODE_MANUAL"] = "TRIGGER_MODE_MANUAL"
    module["TRIGGER_MODE_AUTO"] = "TRIGGER_MODE_AUTO"
    starlark.eval(module, ast, starlark.Globals.standard())
    return tilt


@pytest.fixture(scope="module")
def tilt() -> Tilt:
    return _evaluate()


def _forwards(call: Call) -> set[int]:
    """Local ports of a k8s_resource's port_forwards ("8000:8000", 8000 or port_forward(...))."""
    ports: set[int] = set()
    for forward in call.kwargs.get("port_forwards", []):
        if isinstance(forward, Call):
            ports.add(int(forward.args[0]))
        else:
            ports.add(int(str(forward).split(":")[0]))
    return ports


def test_tiltfile_parses_with_the_extended_dialect() -> None:
    ast = starlark.parse("Tiltfile", (REPO / "Tiltfile").read_text(), starlark.Dialect.extended())
    assert [load.module_id for load in ast.loads()] == []  # no extension downloads needed


def test_version_settings_comes_first(tilt: Tilt) -> None:
    assert tilt.calls[0].name == "version_settings"
    assert tilt.calls[0].kwargs["constraint"].startswith(">=")


def test_image_build_and_live_update(tilt: Tilt) -> None:
    (build,) = tilt.named("docker_build")
    ref, context = build.args
    assert (ref, context) == ("sessiond", ".")
    assert build.kwargs["target"] == "dev"
    assert set(SOURCE_DIRS) <= set(build.kwargs["only"])
    steps: list[Call] = build.kwargs["live_update"]
    syncs = [s.args for s in steps if s.name == "sync"]
    assert syncs == [(f"{d}/", f"/app/{d}/") for d in SOURCE_DIRS]
    # the last step re-runs the process through the dev image's wrapper
    assert steps[-1].name == "run"
    assert steps[-1].args[0].split()[0] == "tilt-run"


def test_only_lists_what_the_dockerfile_copies(tilt: Tilt) -> None:
    (build,) = tilt.named("docker_build")
    copied = {
        src.rstrip("/")
        for line in (REPO / build.kwargs["dockerfile"]).read_text().splitlines()
        if line.startswith("COPY ") and "--from=" not in line and "<<" not in line
        for src in line.split()[1:-1]
        if not src.startswith("--")
    }
    assert copied == set(build.kwargs["only"])


def test_dev_overlay_is_deployed(tilt: Tilt) -> None:
    (k8s_yaml,) = tilt.named("k8s_yaml")
    (blob,) = k8s_yaml.args
    assert blob == Call("kustomize", ("k8s/overlays/dev",), {})


def test_resources_exist_and_are_ordered(tilt: Tilt, dev_docs: list[Doc]) -> None:
    # Given the workloads the dev overlay renders (Tilt names a resource after its workload)
    workload_names = {doc["metadata"]["name"] for doc, _ in workloads(dev_docs)}
    configured = {c.args[0] for c in tilt.named("k8s_resource")}
    local = {c.args[0] for c in tilt.named("local_resource")}
    # Then every configured resource is one of them, and every workload is configured
    assert configured == workload_names
    for call in tilt.named("k8s_resource") + tilt.named("local_resource"):
        assert set(call.kwargs.get("resource_deps", [])) <= workload_names | local, call.args[0]
    # and migrations run before anything that needs the schema
    for name in ("sessiond-api", "sessiond-worker", "sessiond-scheduler"):
        assert "sessiond-migrate" in tilt.resource(name).kwargs["resource_deps"]
    assert "postgres" in tilt.resource("sessiond-migrate").kwargs["resource_deps"]


def test_port_forwards(tilt: Tilt) -> None:
    assert _forwards(tilt.resource("sessiond-api")) == {8000}
    assert 15672 in _forwards(tilt.resource("rabbitmq"))
    assert _forwards(tilt.resource("postgres")) == {5432}


def test_buttons_are_manual_and_do_what_they_say(tilt: Tilt, dev_docs: list[Doc]) -> None:
    buttons = {c.args[0]: c for c in tilt.named("local_resource")}
    assert set(buttons) == {"locust-smoke", "demo-login", "demo-logout"}
    for call in buttons.values():
        assert call.kwargs["auto_init"] is False
        assert call.kwargs["trigger_mode"] == "TRIGGER_MODE_MANUAL"
    locust = shlex.split(buttons["locust-smoke"].kwargs["cmd"])
    assert locust[:3] == ["locust", "-f", "loadtests/locustfiles"]
    assert "--headless" in locust and "-t" in locust  # always bounded
    assert locust[locust.index("--host") + 1] == "http://127.0.0.1:8000"  # the port-forward
    # the token secret given to Locust is the one the dev API verifies with
    secrets = dict(
        line.split("=", 1)
        for line in (K8S / "overlays/dev/sessiond-secrets.env").read_text().splitlines()
        if line
    )
    assert buttons["locust-smoke"].kwargs["env"]["SESSIOND_JWT_SECRET"] == secrets["jwt-secret"]
    for button, event in (("demo-login", "connected"), ("demo-logout", "disconnected")):
        argv = shlex.split(buttons[button].kwargs["cmd"])
        assert argv[:2] == ["kubectl", "exec"]
        separator = argv.index("--")
        assert argv[separator + 1 : separator + 4] == ["sessiond", "publish", event]
        # the pod and container it execs into exist
        assert "deploy/sessiond-api" in argv and argv[argv.index("-c") + 1] == "api"


def test_every_referenced_path_exists(tilt: Tilt) -> None:
    (build,) = tilt.named("docker_build")
    paths = [build.args[1], build.kwargs["dockerfile"], *build.kwargs["only"]]
    paths += [s.args[0] for s in build.kwargs["live_update"] if s.name == "sync"]
    paths += [c.args[0] for c in tilt.named("kustomize")]
    paths += tilt.files_read
    for call in tilt.named("local_resource"):
        paths += call.kwargs.get("deps", [])
        argv = shlex.split(call.kwargs["cmd"])
        if "-f" in argv:
            paths.append(argv[argv.index("-f") + 1])
    missing = [p for p in paths if not (REPO / p).exists()]
    assert missing == []
    assert all(not Path(p).is_absolute() for p in paths)
