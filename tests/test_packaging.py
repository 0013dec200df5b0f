"""Packaging that cannot run here (Docker) is checked for structure (the import graph: test_architecture)."""

from __future__ import annotations

import re
from pathlib import Path

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


def test_only_the_registry_calls_torch_jit():
    for path in (REPO / "service").rglob("*.py"):
        if path.name != "registry.py":
            assert "torch.jit" not in path.read_text(), path
