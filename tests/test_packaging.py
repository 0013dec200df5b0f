"""Packaging that cannot run here (Docker) is checked for structure (the import graph: test_architecture)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.helpers.data import REPO

LOCK = REPO / "requirements.lock"


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def declared_requirements() -> dict[str, list[Requirement]]:
    """pyproject's requirements: ``{"": runtime dependencies, extra: that extra's}``."""
    project = pyproject()["project"]
    groups = {"": project["dependencies"], **project.get("optional-dependencies", {})}
    return {group: [Requirement(line) for line in lines] for group, lines in groups.items()}


def locked() -> dict[str, Version]:
    """requirements.lock as ``{canonical name: version}``; every line must be an exact ``name==version`` pin."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)", line.strip())
        assert match, f"requirements.lock: not an exact pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"requirements.lock pins {name} twice"
        pins[name] = Version(match.group(2))
    return pins


def make_commands(target: str) -> list[str]:
    """The commands ``make`` would run for ``target`` (``-n -B``: printed, not run, as if nothing were built)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    listed = subprocess.run(
        ["make", "-n", "-B", target, "PYTHON=python3"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return listed.stdout.replace("\\\n", " ").splitlines()


def test_the_lock_pins_every_declared_dependency_within_its_range():
    pins = locked()
    assert "calibserve" not in pins  # the project itself is installed editable, never pinned
    for group, requirements in declared_requirements().items():
        for requirement in requirements:
            name = canonicalize_name(requirement.name)
            where = f"{requirement} ({'dependencies' if not group else f'extra {group!r}'})"
            assert name in pins, f"requirements.lock does not pin {where}: run make lock"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"requirements.lock has {name}=={pins[name]}, outside {where}: run make lock"
            )
    # torch without a local label (+cpu, +cu128): the pin must match whichever build an index serves
    assert pins["torch"].local is None
    # the ranges stay ranges for people installing calibserve into their own environment
    runtime = {canonicalize_name(r.name): r for r in declared_requirements()[""]}
    assert not all(str(r.specifier).startswith("==") for r in runtime.values())


def test_make_install_installs_every_extra_with_the_lock_as_constraints():
    commands = [
        c for c in make_commands("install") if " install " in f" {c} " and c.startswith(".venv/bin/pip")
    ]
    installs = [c for c in commands if "--upgrade pip" not in c]
    assert installs, commands
    for command in installs:
        assert "-c requirements.lock" in command, command
    assert any("torch==" in command for command in installs)
    editable = [c for c in installs if " -e " in c]
    assert len(editable) == 1, installs
    extras = re.search(r"\.\[([^\]]*)\]", editable[0]).group(1).split(",")
    assert sorted(extras) == sorted(group for group in declared_requirements() if group)


def test_make_install_makes_the_triton_virtualenv_from_its_own_pins():
    """Triton's server (tests/triton/serve.py) needs numpy<2: its own virtualenv, pinned by its own file."""
    triton_lock = REPO / "tests" / "triton" / "requirements.txt"
    pins = {}
    for line in triton_lock.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)", line.strip())
            assert match, f"{triton_lock.name}: not an exact pin: {line!r}"
            pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    assert pins["nvidia-pytriton"] == Version("0.7.0") and pins["numpy"] < Version("2")
    commands = make_commands("install")
    assert "python3 -m venv .venv-triton" in commands
    installs = [
        c for c in commands if c.startswith(".venv-triton/bin/pip install") and "--upgrade pip" not in c
    ]
    assert installs == [
        ".venv-triton/bin/pip install -c tests/triton/requirements.txt nvidia-pytriton==0.7.0"
    ]
    # `make test` brings it up to date; `make clean` removes it
    assert any(c.startswith(".venv-triton/bin/pip install -c") for c in make_commands("test"))
    assert ".venv-triton" in next(c for c in make_commands("clean") if c.startswith("rm -rf")).split()


def test_make_lock_resolves_the_unpinned_ranges_in_a_fresh_environment():
    script = " ".join(make_commands("lock"))
    assert "-m venv" in script and "mktemp -d" in script  # a throw-away environment, not .venv
    assert 'pip" freeze --exclude-editable' in script and "requirements.lock" in script
    assert "-c requirements.lock" not in script  # the lock is the output, not an input
    assert re.search(r"install --quiet -e '\.\[[^\]]+\]'", script)


def test_the_dockerfile_installs_from_the_lock():
    text = (REPO / "Dockerfile").read_text()
    copied = [name for line in re.findall(r"^COPY (.+)$", text, re.M) for name in line.split()[:-1]]
    assert "requirements.lock" in copied
    # every pip install, in a RUN of its own or in a branch of one (WITH_TORCH: test_dockerfile_torch)
    lines = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    installs = [line for line in lines if re.search(r"\bpip install\b", line)]
    project = [line for line in installs if re.search(r"""pip install .*\s["']?\.(\[|["';\s]|$)""", line)]
    assert project and all("-c requirements.lock" in line for line in project), installs
    # the image can use the PostgreSQL monitoring database (CALIBSERVE_DATABASE_URL=postgresql://...)
    assert any(re.search(r"\.\[[^\]]*\bpostgres\b", line) for line in project), project
    # and the S3 calibrator store (CALIBSERVE_STORE_URL=s3://...)
    assert any(re.search(r"\.\[[^\]]*\bs3\b", line) for line in project), project
    # and serve the Open Inference Protocol over gRPC (CALIBSERVE_GRPC_PORT)
    assert any(re.search(r"\.\[[^\]]*\bgrpc\b", line) for line in project), project
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
    assert Version(torch) == locked()["torch"]


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
