"""Fixtures of the deploy checks: each overlay rendered once per session."""

from __future__ import annotations

import pytest

from ._support import K8S, Doc, kustomize, with_keda


@pytest.fixture(scope="session")
def dev_docs() -> list[Doc]:
    return kustomize(K8S / "overlays" / "dev")


@pytest.fixture(scope="session")
def prod_docs() -> list[Doc]:
    return kustomize(K8S / "overlays" / "prod")


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    """Every rendering that someone can deploy, by name."""
    return {
        "dev": kustomize(K8S / "overlays" / "dev"),
        "prod": kustomize(K8S / "overlays" / "prod"),
        "dev+keda": with_keda(tmp_path_factory.mktemp("dev-keda"), "dev"),
        "prod+keda": with_keda(tmp_path_factory.mktemp("prod-keda"), "prod"),
    }
