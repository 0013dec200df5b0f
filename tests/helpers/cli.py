"""The CLI as a user runs it: ``python -m service ...`` processes, started at once and waited for."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.data import REPO


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: bytes
    stderr: str


def run_all(commands: dict[str, list[str]], cwd: Path, env: dict[str, str] | None = None) -> dict[str, Run]:
    """Start every command at once (each start imports numpy), then wait for all of them: the environment
    without ``CALIBSERVE_*`` variables, plus ``env``, with this checkout first on the path."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CALIBSERVE_")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    environment |= env or {}
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "service", *args],
            cwd=cwd,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, args in commands.items()
    }
    runs = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=240)
        runs[name] = Run(commands[name], process.returncode, stdout, stderr.decode())
    return runs
