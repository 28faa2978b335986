"""Helpers for the deploy checks: offline kustomize rendering and object lookups."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUBECTL = Path("/usr/bin/kubectl")  # v1.32 on the machine image; Debian's v1.20 is too old

Doc = dict[str, Any]


def kustomize(directory: Path) -> list[Doc]:
    """Render a kustomization with the installed kubectl; fail loudly when it cannot."""
    if not KUBECTL.is_file():
        pytest.fail(f"{KUBECTL} is missing: the deploy checks need kubectl >= 1.27 (kustomize v5)")
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def with_keda(tmp: Path, overlay: str) -> list[Doc]:
    """An overlay plus the optional KEDA component, the way a user would enable it."""
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize refuses absolute paths to other kustomizations
                "resources": [os.path.relpath(K8S / "overlays" / overlay, tmp)],
                "components": [os.path.relpath(K8S / "components" / "keda", tmp)],
            }
        )
    )
    return kustomize(tmp)


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(doc: Doc) -> Doc | None:
    """The pod spec of a workload (Deployment, StatefulSet, Job), else None."""
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        spec: Doc = doc["spec"]["template"]["spec"]
        return spec
    return None


def workloads(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    for doc in docs:
        spec = pod_spec(doc)
        if spec is not None:
            yield doc, spec


def is_sessiond(doc: Doc) -> bool:
    labels: dict[str, str] = doc["metadata"].get("labels", {})
    return labels.get("app.kubernetes.io/name") == "sessiond"
