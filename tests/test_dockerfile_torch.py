"""The Dockerfile's WITH_TORCH build argument (1, the default: torch installed; 0: an image without torch), and
the ``postgres`` extra (psycopg 3, for CALIBSERVE_DATABASE_URL=postgresql://...) that both install.

Docker cannot run here, so the Dockerfile is read as text, and the RUN instructions that depend on WITH_TORCH
are run as the image's /bin/sh would run them (dash where installed), with each build argument in the
environment as Docker sets it, and a stand-in ``pip`` that records what it was asked to install.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

from service.cli import main
from tests.helpers.data import REPO

DOCKERFILE = REPO / "Dockerfile"
SHELL = shutil.which("dash") or shutil.which("sh")


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: comments dropped, backslash-continued lines joined, as Docker does."""
    joined, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.endswith("\\"):
            current += line[:-1]
            continue
        joined.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends in a continuation"
    return [(found.split(None, 1)[0].upper(), found.split(None, 1)[1]) for found in joined]


def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


def build_args() -> dict[str, str]:
    """The ``ARG NAME=default`` declarations of the stage."""
    return dict(arguments.split("=", 1) for keyword, arguments in dockerfile() if keyword == "ARG")


def torch_dependent_runs() -> list[str]:
    return [
        arguments for keyword, arguments in dockerfile() if keyword == "RUN" and "WITH_TORCH" in arguments
    ]


def test_the_instruction_reader_joins_continuations_and_skips_comments():
    text = "FROM x\n# c\nRUN a \\\n    && b\nARG N=1\n"
    assert instructions(text) == [("FROM", "x"), ("RUN", "a     && b"), ("ARG", "N=1")]


def test_with_torch_is_declared_in_the_stage_with_default_1_before_its_first_use():
    steps = dockerfile()
    declared = [
        i
        for i, (keyword, arguments) in enumerate(steps)
        if keyword == "ARG" and arguments.startswith("WITH_TORCH")
    ]
    assert len(declared) == 1
    assert steps[declared[0]][1] == "WITH_TORCH=1"
    first_from = next(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    first_use = next(
        i
        for i, (_, arguments) in enumerate(steps)
        if "$WITH_TORCH" in arguments or "${WITH_TORCH}" in arguments
    )
    assert first_from < declared[0] < first_use  # an ARG before FROM would not reach the stage's RUNs
    head = DOCKERFILE.read_text(encoding="utf-8").split("\nFROM", 1)[0]
    assert "--build-arg WITH_TORCH=0" in head  # documented at the top


def test_every_run_that_installs_torch_or_the_project_is_conditional_on_with_torch():
    runs = [
        arguments for keyword, arguments in dockerfile() if keyword == "RUN" and "pip install" in arguments
    ]
    torch_runs = [run for run in runs if "torch==" in run]
    assert torch_runs
    for run in runs:
        if "torch==" in run or re.search(r"""pip install .*\s["']?\.(\[|["';\s]|$)""", run):
            assert re.search(r'if \[ "\$WITH_TORCH" = "1" \]; then', run), run
    # the torch install sits in the branch that WITH_TORCH=1 takes, before any else/elif
    for run in torch_runs:
        branch = re.search(r'if \[ "\$WITH_TORCH" = "1" \]; then(.*?)(elif|else|fi)', run).group(1)
        assert "torch==${TORCH_VERSION}" in branch


# --- the RUN instructions, run -----------------------------------------------------------------------------

FAKE_PIP = """#!{python}
import json, os, sys
args = sys.argv[1:]
requirements = [open(args[i + 1]).read().split() for i, a in enumerate(args) if a == "-r"]
with open(os.environ["PIP_LOG"], "a") as log:
    log.write(json.dumps({{"args": args, "requirements": requirements}}) + "\\n")
"""


def run_torch_steps(tmp_path: Path, with_torch: str) -> tuple[int, str, list[dict]]:
    """Run the RUN instructions that use WITH_TORCH in order, in a copy of the build context's files they
    read; stop at the first that fails. Returns its exit status, stderr, and the pip calls."""
    if SHELL is None:
        pytest.skip("no POSIX shell")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pip = bin_dir / "pip"
    pip.write_text(FAKE_PIP.format(python=sys.executable))
    pip.chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)  # the image's python: 3.11 has tomllib
    context = tmp_path / "app"
    context.mkdir()
    for name in ("pyproject.toml", "requirements.lock"):
        shutil.copy(REPO / name, context / name)
    log = tmp_path / "pip.log"
    env = {
        **build_args(),
        "WITH_TORCH": with_torch,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PIP_LOG": str(log),
        "TMPDIR": str(tmp_path),
    }
    status, stderr = 0, ""
    for run in torch_dependent_runs():
        # /tmp of the image is the test's own directory here
        done = subprocess.run(
            [SHELL, "-c", run.replace("/tmp/", f"{tmp_path}/")],
            cwd=context,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            status, stderr = done.returncode, done.stderr
            break
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return status, stderr, calls


def runtime_requirements() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def postgres_requirements() -> list[str]:
    """The ``postgres`` extra: what the PostgreSQL monitoring database needs (service/monitoring_postgres.py)."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "postgres"
    ]


def s3_requirements() -> list[str]:
    """The ``s3`` extra: what the S3 calibrator store needs (service/store_s3.py)."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["s3"]


def grpc_requirements() -> list[str]:
    """The ``grpc`` extra: the Open Inference Protocol over gRPC (service/api/grpc/, service/upstream_grpc.py)."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["grpc"]


def test_the_postgres_extra_brings_psycopg_3_with_its_own_libpq():
    # python:3.11-slim has no libpq: psycopg's binary build (libpq bundled) is what the image can import
    (psycopg,) = [
        Requirement(line) for line in postgres_requirements() if Requirement(line).name == "psycopg"
    ]
    assert "binary" in psycopg.extras and psycopg.specifier.contains("3.2")


def test_with_torch_1_installs_torch_from_its_index_then_the_project_with_its_dependencies_and_postgres(
    tmp_path,
):
    status, stderr, calls = run_torch_steps(tmp_path, "1")
    assert status == 0, stderr
    args = build_args()
    assert [call["args"] for call in calls] == [
        ["install", "--no-deps", "--index-url", args["TORCH_INDEX"], f"torch=={args['TORCH_VERSION']}"],
        ["install", "-c", "requirements.lock", ".[postgres,s3,grpc]"],
    ]


def test_with_torch_0_installs_every_runtime_and_postgres_dependency_but_torch_and_the_project_without_them(
    tmp_path,
):
    status, stderr, calls = run_torch_steps(tmp_path, "0")
    assert status == 0, stderr
    assert all("-c" in call["args"] and "requirements.lock" in call["args"] for call in calls), calls
    assert not any(re.match(r"torch([=<>!~\[ ]|$)", arg) for call in calls for arg in call["args"]), calls
    (listed,) = [call for call in calls if call["requirements"]]
    (requirements,) = listed["requirements"]
    names = {Requirement(line).name.lower() for line in requirements}
    declared = [
        Requirement(line)
        for line in runtime_requirements() + postgres_requirements() + s3_requirements() + grpc_requirements()
    ]
    expected = {requirement.name.lower() for requirement in declared} - {"torch"}
    assert expected and names == expected and {"psycopg", "boto3", "grpcio", "tritonclient"} <= names
    # each as declared: psycopg with its [binary] extra, the ranges kept (the lock pins the versions)
    assert {str(Requirement(line)) for line in requirements} == {
        str(requirement) for requirement in declared if requirement.name != "torch"
    }
    project = [call["args"] for call in calls if call["args"][-1] == "."]
    assert project == [["install", "-c", "requirements.lock", "--no-deps", "."]]
    assert calls.index(listed) < [call["args"] for call in calls].index(project[0])
    assert not list(tmp_path.glob("requirements-no-torch*"))  # the temporary list is removed


@pytest.mark.parametrize("value", ["2", "yes", "", "true"])
def test_any_other_with_torch_value_stops_the_build_before_installing_anything(tmp_path, value):
    status, stderr, calls = run_torch_steps(tmp_path, value)
    assert status != 0
    assert "WITH_TORCH must be 1 or 0" in stderr
    assert calls == []


# --- what an image without torch can do ---------------------------------------------------------------------

# Runs in a fresh interpreter; with NO_TORCH=1, ``import torch`` fails there as in an image built with
# WITH_TORCH=0 (and says so on stderr). It serves a logits-only model from a calibrator document fitted elsewhere
# (as deploy/kserve/README.md says to do) and prints the status of each request.
TORCH_ATTEMPT = "no-torch: an import of torch was attempted"
LOGITS_ONLY_SCRIPT = r"""
import json, os, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            print(os.environ["TORCH_ATTEMPT"], file=sys.stderr, flush=True)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

if os.environ.get("NO_TORCH") == "1":
    sys.meta_path.insert(0, NoTorch())
from fastapi.testclient import TestClient
from service.api.app import create_app
from service.config import Settings
store, models, document, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
app = create_app(Settings(store_dir=store, models_dir=models))
logits = [[float((i * 7 + k * 3) % 11) - 5.0 for k in range(10)] for i in range(rows)]
with TestClient(app, raise_server_exceptions=False) as client:
    statuses = {
        "healthz": client.get("/healthz").status_code,
        "readyz": client.get("/readyz").status_code,
        "declare": client.put("/v1/models/classifier", json={"num_classes": 10}).status_code,
        "upload": client.post(
            "/v1/models/classifier/calibrators", content=open(document, "rb").read(),
            headers={"content-type": "application/json"},
        ).status_code,
    }
    answer = client.post("/v1/models/classifier/calibrate", json={"logits": logits})
    statuses["calibrate"] = answer.status_code
    statuses["rows"] = len(answer.json().get("probabilities", []))
    fit_logits = [[float((i * 5 + k * 3) % 13) - 6.0 for k in range(10)] for i in range(40)]
    labelled = {"logits": fit_logits, "labels": [i % 10 for i in range(40)], "activate": False}
    statuses["fit_histogram"] = client.post(
        "/v1/models/classifier/fit", json={**labelled, "method": "histogram"}
    ).status_code
    # what needs torch: a clear 501 naming it without, served with it
    fit = client.post("/v1/models/classifier/fit", json={**labelled, "method": "temperature"})
    export = client.get("/v1/models/classifier/export")
    statuses["fit_temperature"] = fit.status_code
    statuses["export"] = export.status_code
    statuses["names_torch"] = all("torch" in r.json()["detail"] for r in (fit, export) if r.status_code == 501)
print(json.dumps(statuses))
"""


class TorchNeeded(Exception):
    """A request or the start-up failed where calibserve tried to import torch."""


@pytest.fixture(scope="module")
def fitted_document(tmp_path_factory) -> Path:
    """A temperature calibrator document for model ``classifier``, fitted here (with torch) by the CLI."""
    folder = tmp_path_factory.mktemp("fit")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 10)) * 3
    labels = logits.argmax(axis=1)
    labels[:60] = rng.integers(0, 10, 60)
    np.save(folder / "logits.npy", logits)
    np.save(folder / "labels.npy", labels)
    out = folder / "calibrator.json"
    argv = ["fit", "--logits", str(folder / "logits.npy"), "--labels", str(folder / "labels.npy")]
    assert main([*argv, "--model", "classifier", "--out", str(out)]) in (0, None)
    return out


def serve_logits_only(tmp_path: Path, document: Path, rows: int, *, no_torch: bool) -> None:
    """Serve ``rows`` rows of logits through a fresh process; raise TorchNeeded when that failed where torch
    was imported, AssertionError when it failed otherwise."""
    (tmp_path / "store").mkdir()
    (tmp_path / "models").mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("CALIBSERVE_")} | {
        "PYTHONPATH": str(REPO),
        "NO_TORCH": "1" if no_torch else "0",
        "TORCH_ATTEMPT": TORCH_ATTEMPT,
    }
    argv = [str(tmp_path / "store"), str(tmp_path / "models"), str(document), str(rows)]
    done = subprocess.run(
        [sys.executable, "-c", LOGITS_ONLY_SCRIPT, *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    statuses = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    needs_torch = (
        {"fit_temperature": 501, "export": 501} if no_torch else {"fit_temperature": 201, "export": 200}
    )
    if statuses == {**SERVED, "rows": rows, **needs_torch, "names_torch": True}:
        return
    problem = f"{statuses}; stderr: {done.stderr[-3000:]}"
    if TORCH_ATTEMPT in done.stderr:
        raise TorchNeeded(problem)
    raise AssertionError(problem)


SERVED = {
    "healthz": 200,
    "readyz": 200,
    "declare": 201,
    "upload": 201,
    "calibrate": 200,
    "fit_histogram": 201,
}


@pytest.mark.parametrize("rows", [4, 4000], ids=["small batch", "batch of 40000 logits"])
def test_the_logits_only_requests_work_with_torch_installed(tmp_path, fitted_document, rows):
    serve_logits_only(tmp_path, fitted_document, rows, no_torch=False)


@pytest.mark.parametrize("rows", [4, 4000], ids=["small batch", "batch of 40000 logits"])
def test_an_image_without_torch_serves_logits_only_models(tmp_path, fitted_document, rows):
    serve_logits_only(tmp_path, fitted_document, rows, no_torch=True)
