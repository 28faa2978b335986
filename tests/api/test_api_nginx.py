"""A real nginx (Debian package), ``auth_request /auth/check`` in front of protected locations."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from loadtests.harness import free_port
from tests.api.conftest import Api, mint
from tests.proxies.conftest import NGINX_MAIN, nginx_binary

pytestmark = pytest.mark.integration

# The server block of this test; the main file around it is the proxies suite's (one copy).
NGINX_SERVER = """
    upstream sessiond {{ server {api}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};

        # The forward-auth subrequest: headers only, no body.
        location = /auth/check {{
            internal;
            proxy_pass http://sessiond/auth/check;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
        }}

        # Static files behind the check.
        location /static/ {{
            auth_request /auth/check;
            alias {dir}/static/;
        }}

        # An application behind the check, told who the caller is.
        location /app/ {{
            auth_request /auth/check;
            auth_request_set $uid $upstream_http_x_user_id;
            auth_request_set $sid $upstream_http_x_session_id;
            proxy_set_header X-User-Id $uid;
            proxy_set_header X-Session-Id $sid;
            proxy_pass http://127.0.0.1:{port}/upstream/;
        }}

        # The "application": echoes the identity headers it received.
        location /upstream/ {{
            allow 127.0.0.1;
            deny all;
            default_type text/plain;
            return 200 "user=$http_x_user_id session=$http_x_session_id\\n";
        }}
    }}
"""


@pytest.fixture
def nginx(api: Api, tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "nginx"
    for sub in ("tmp", "static"):
        (root / sub).mkdir(parents=True)
    (root / "static" / "hello.txt").write_text("hello from a protected file\n")
    port = free_port()
    conf = root / "nginx.conf"
    (root / "sessiond.conf").write_text(
        NGINX_SERVER.format(dir=root, port=port, api=urlsplit(api.url).netloc)
    )
    # Workers of a root master run as "nobody", which cannot read pytest's tmp dir.
    conf.write_text(NGINX_MAIN.format(dir=root, user="user root;" if os.geteuid() == 0 else ""))
    proc = subprocess.Popen(
        [nginx_binary(), "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def curl(url: str, token: str | None = None) -> tuple[int, dict[str, str], str]:
    """curl, as an operator would; returns status, headers (lower-cased names) and body."""
    argv = ["curl", "-s", "-D", "-", "--max-time", "10", url]
    if token is not None:
        argv += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(argv, capture_output=True, check=True).stdout.decode()
    head, _, body = out.partition("\r\n\r\n")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


async def test_nginx_auth_request(api: Api, nginx: str) -> None:
    async def call(path: str, token: str | None = None) -> tuple[int, dict[str, str], str]:
        return await asyncio.to_thread(curl, nginx + path, token)

    # Given a connected user with a session
    await api.event("connected", "42", session_id="laptop", email="j@example.com")
    token = mint("42", sid="laptop")
    # A valid token reaches the static file and the application, which learns who called
    status, _, body = await call("/static/hello.txt", token)
    assert (status, body) == (200, "hello from a protected file\n")
    status, _, body = await call("/app/anything", token)
    assert (status, body) == (200, "user=42 session=laptop\n")
    # No token or a bad one: 401 with the RFC 6750 challenge passed through by nginx
    status, headers, _ = await call("/static/hello.txt")
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert (await call("/app/x", "garbage"))[0] == 401
    # A valid token of a user who is not connected: 403
    assert (await call("/static/hello.txt", mint("nobody")))[0] == 403
    # And once the user disconnects, the next request through nginx is refused
    await api.event("disconnected", "42")
    assert (await call("/app/anything", token))[0] == 403
