"""Packaging that cannot run here (Docker) is checked for structure; the import graph is enforced."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_compose_runs_two_replicas_on_one_named_volume_with_readiness_checks():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"calibserve", "calibserve-replica"}
    for service in services.values():
        assert "calibrators:/data" in service["volumes"]
        assert any(volume.startswith("./models:/app/models") for volume in service["volumes"])
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        assert service["environment"]["CALIBSERVE_STORE_DIR"] == "/data"
        assert "CALIBSERVE_API_KEYS" in service["environment"]
        assert all(port.startswith("127.0.0.1:") for port in service["ports"])
    assert "calibrators" in compose["volumes"]
    assert services["calibserve-replica"]["depends_on"]["calibserve"]["condition"] == "service_healthy"
    assert (REPO / compose["x-calibserve"]["build"]["context"] / "Dockerfile").is_file()


def test_dockerfile_is_slim_non_root_cpu_by_default_with_a_cuda_switch():
    text = (REPO / "Dockerfile").read_text()
    instructions = [line.split()[0] for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert instructions[0] == "FROM"
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^USER calibserve$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu$", text, re.M)
    assert "torch==${TORCH_VERSION}" in text and "ARG TORCH_VERSION=2.13.0" in text
    assert "HEALTHCHECK" in instructions and "/readyz" in text
    assert re.search(r'^ENTRYPOINT \["calibserve", "serve"\]$', text, re.M)
    for copied in re.findall(r"^COPY (\S+)", text, re.M):
        assert (REPO / copied).exists(), copied
    pinned = re.search(r'"torch==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f"ARG TORCH_VERSION={pinned}" in text


LAYERS = {
    # module prefix -> the service modules it may import
    "service.errors": set(),
    "service.core": {"service.errors", "service.core"},
    "service.store": {"service.errors"},
    "service.registry": {"service.errors", "service.store", "service.core"},
    "service.export": {"service.errors", "service.core", "service.registry"},
    "service.config": {"service.errors"},
    "service.workflows": {"service.errors", "service.core"},
    "service.reports": {"service.errors", "service.core", "service.workflows", "service.plots"},
    "service.plots": {"service.errors", "service.core"},
    "service.io": {"service.errors", "service.core"},
    "service.api": {
        "service.errors",
        "service.core",
        "service.store",
        "service.registry",
        "service.export",
        "service.config",
        "service.workflows",
        "service.api",
    },
    "service.client": {"service.errors"},
    "service.cli": {
        "service.errors",
        "service.core",
        "service.workflows",
        "service.config",
        "service.client",
        "service.api",
        "service.reports",
        "service.plots",
        "service.io",
        "service.store",
    },
}
WEB = {"fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "httpx"}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def layer_of(module: str) -> str | None:
    return max(
        (prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")),
        key=len,
        default=None,
    )


@pytest.mark.parametrize(
    "path", sorted((REPO / "service").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO))
)
def test_import_direction(path):
    module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    layer = layer_of(module)
    if layer is None:
        return
    for name in imports_of(path):
        if name.startswith("service."):
            assert layer_of(name) in LAYERS[layer], f"{module} must not import {name}"
        if name.split(".")[0] in {"fastapi", "starlette", "uvicorn"}:
            assert layer == "service.api" or module == "service.cli", f"{module} imports {name}"
        if layer == "service.core":
            assert name.split(".")[0] not in WEB, f"core module {module} imports {name}"
        if "torch.jit" in name or name == "torch.jit":
            assert layer == "service.registry", f"{module} imports {name}"


def test_only_the_registry_calls_torch_jit():
    for path in (REPO / "service").rglob("*.py"):
        if path.name != "registry.py":
            assert "torch.jit" not in path.read_text(), path
