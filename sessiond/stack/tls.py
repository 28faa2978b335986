"""The stack's own CA and leaf certificates (openssl), for RabbitMQ's TLS listener and tests."""

from __future__ import annotations

from pathlib import Path

from sessiond.stack.proc import run


def make_ca(tls: Path) -> None:
    key, cert = tls / "ca.key", tls / "ca.pem"
    if cert.exists():
        return
    tls.mkdir(parents=True, exist_ok=True)
    run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
         "-subj", "/CN=sessiond local CA", "-keyout", str(key), "-out", str(cert)],
        server="tls",
    )  # fmt: skip


def make_cert(tls: Path, name: str, *, cn: str, san: str | None = None) -> tuple[Path, Path]:
    """A leaf certificate signed by the stack's CA; ``san`` like ``DNS:localhost,IP:127.0.0.1``."""
    key, csr, cert = tls / f"{name}.key", tls / f"{name}.csr", tls / f"{name}.pem"
    if cert.exists():
        return cert, key
    make_ca(tls)
    run(
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
         "-keyout", str(key), "-out", str(csr)],
        server="tls",
    )  # fmt: skip
    ext = tls / f"{name}.ext"
    lines = ["basicConstraints=CA:FALSE", "keyUsage=digitalSignature,keyEncipherment"]
    if san:
        lines.append(f"subjectAltName={san}")
    ext.write_text("\n".join(lines) + "\n")
    run(
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(tls / "ca.pem"),
         "-CAkey", str(tls / "ca.key"), "-CAcreateserial", "-days", "825",
         "-extfile", str(ext), "-out", str(cert)],
        server="tls",
    )  # fmt: skip
    for path in (key, cert):
        path.chmod(0o644)
    return cert, key
