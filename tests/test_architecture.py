"""The import direction of docs/architecture.md, checked on the source (function-level imports included).

Bottom to top: errors <- names <- core <- store, registry, export <- config, workflows <- serving <- api,
client <- cli. A layer imports only from layers below it; nothing imports the CLI; only ``api`` imports a
web framework; ``core`` imports no I/O, settings or web layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "service"

# What each module (or package) of service/ may import from service/. The first matching prefix decides.
ALLOWED: list[tuple[str, set[str]]] = [
    ("service.errors", set()),
    ("service.lazy", {"service.errors"}),
    ("service.names", {"service.errors"}),
    ("service.inference_protocol", {"service.errors"}),
    ("service.inference_grpc", {"service.errors", "service.inference_protocol", "service.lazy"}),
    ("service.monitoring_store", {"service.errors", "service.core"}),
    ("service.monitoring_postgres", {"service.errors", "service.core", "service.monitoring_store"}),
    (
        "service.upstream_grpc",
        {"service.errors", "service.inference_protocol", "service.inference_grpc", "service.lazy"},
    ),
    ("service.http_pool", set()),
    (
        "service.upstream",
        {
            "service.errors",
            "service.names",
            "service.inference_protocol",
            "service.http_pool",
            "service.upstream_grpc",
        },
    ),
    ("service.core", {"service.errors", "service.core", "service.lazy"}),
    ("service.store", {"service.errors", "service.names"}),
    ("service.store_s3", {"service.errors", "service.names", "service.lazy", "service.store"}),
    ("service.stores", {"service.errors", "service.store", "service.store_s3"}),
    ("service.registry", {"service.errors", "service.names", "service.core", "service.lazy"}),
    ("service.export", {"service.errors", "service.core", "service.registry"}),
    ("service.config", {"service.errors", "service.names"}),
    ("service.workflows", {"service.errors", "service.core"}),
    ("service.multilabel_workflows", {"service.errors", "service.core", "service.workflows"}),
    ("service.io", {"service.errors", "service.core"}),
    ("service.plots", {"service.errors", "service.core"}),
    (
        "service.reports",
        {
            "service.errors",
            "service.core",
            "service.workflows",
            "service.multilabel_workflows",
            "service.plots",
        },
    ),
    # the reliability diagram the console shows is the CLI's figure: the one serving module that draws it imports
    # plots.py (matplotlib) inside its function, so a worker that never draws one never imports matplotlib
    ("service.serving.diagrams", {"service.plots"}),
    (
        "service.serving",
        {
            "service.errors",
            "service.names",
            "service.core",
            "service.store",
            "service.store_s3",
            "service.stores",
            "service.registry",
            "service.export",
            "service.config",
            "service.workflows",
            "service.multilabel_workflows",
            "service.serving",
            "service.upstream",
            "service.inference_protocol",
            "service.inference_grpc",
            "service.lazy",
            "service.monitoring_store",
            "service.monitoring_postgres",
        },
    ),
    (
        "service.api",
        {
            "service.errors",
            "service.names",
            "service.core",
            "service.store",
            "service.store_s3",
            "service.stores",
            "service.registry",
            "service.export",
            "service.config",
            "service.workflows",
            "service.multilabel_workflows",
            "service.serving",
            "service.api",
            "service.upstream",
            "service.inference_protocol",
            "service.inference_grpc",
            "service.monitoring_store",
        },
    ),
    ("service.client", {"service.errors", "service.io"}),
    ("service.cli", {"service"}),  # the top: anything
    ("service.__main__", {"service.cli"}),
    ("service", set()),  # service/__init__.py
]
WEB = ("fastapi", "starlette", "uvicorn")
# Third-party imports a layer must not make (beyond what its allowed service modules bring).
FORBIDDEN_THIRD_PARTY = {
    "service.core": (*WEB, "pydantic", "pydantic_settings", "httpx", "orjson", "prometheus_client"),
    "service.serving": WEB,
    "service.workflows": (*WEB, "pydantic"),
    "service.multilabel_workflows": (*WEB, "pydantic"),
    "service.store": WEB,
    "service.store_s3": WEB,
    "service.stores": WEB,
    "service.registry": WEB,
    "service.http_pool": (*WEB, "httpx", "aiohttp"),
    "service.upstream": (*WEB, "httpx", "aiohttp"),
    "service.upstream_grpc": (*WEB, "httpx", "aiohttp"),
    "service.inference_protocol": (*WEB, "httpx"),
    "service.inference_grpc": (*WEB, "httpx"),
    "service.monitoring_store": (*WEB, "psycopg"),
    "service.monitoring_postgres": (*WEB, "httpx"),
}
# psycopg is the `postgres` extra: only the PostgreSQL backend imports it, and only open_store() imports that
# (where CALIBSERVE_DATABASE_URL names a postgresql:// database), so an install without the extra runs the rest.
POSTGRES_DRIVER = "psycopg"
POSTGRES_BACKEND = "service.monitoring_postgres"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, name: str | None = None) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append(target)
            found += [f"{target}.{alias.name}" for alias in node.names if target == "service"]
    return found


def rule(name: str) -> tuple[str, set[str]]:
    for prefix, allowed in ALLOWED:
        if name == prefix or name.startswith(prefix + "."):
            return prefix, allowed
    raise AssertionError(f"{name} has no place in the layering; add it to ALLOWED and docs/architecture.md")


def within(target: str, allowed: set[str]) -> bool:
    return any(target == prefix or target.startswith(prefix + ".") for prefix in allowed)


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_module_imports_only_from_the_layers_below(path):
    name = module_name(path)
    prefix, allowed = rule(name)
    own = {target for target in imports(path) if target == "service" or target.startswith("service.")}
    wrong = sorted(
        target
        for target in own
        if target != "service" and not within(target, allowed | {prefix}) and not within(target, {name})
    )
    assert not wrong, f"{name} imports {wrong}; the layer {prefix} may import only {sorted(allowed)}"
    forbidden = FORBIDDEN_THIRD_PARTY.get(prefix, ())
    third = sorted(target for target in imports(path) if target.split(".")[0] in forbidden)
    assert not third, f"{name} imports {third}, which its layer must not"


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_only_the_http_layer_imports_a_web_framework(path):
    name = module_name(path)
    if rule(name)[0] in ("service.api", "service.cli"):
        return
    web = sorted(target for target in imports(path) if target.split(".")[0] in WEB)
    assert not web, f"{name} imports {web}; only service.api speaks HTTP"


def test_only_the_postgres_backend_imports_psycopg_and_only_lazily():
    importers = sorted(
        module_name(path)
        for path in MODULES
        if any(target.split(".")[0] == POSTGRES_DRIVER for target in imports(path))
    )
    assert importers == [POSTGRES_BACKEND]
    for path in MODULES:
        tree = ast.parse(path.read_text(), filename=str(path))
        top_level = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        for node in top_level:
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            assert POSTGRES_BACKEND not in names, (
                f"{module_name(path)} imports {POSTGRES_BACKEND} at import time"
            )


# grpcio and the stubs are the `grpc` extra: only the gRPC codec imports grpc, and the app imports the codec
# only in its lifespan where CALIBSERVE_GRPC_PORT is set, so an install without the extra serves HTTP.
GRPC_DRIVER = "grpc"
GRPC_CODEC = "service.api.grpc"


def test_only_the_grpc_codec_imports_grpcio_and_only_lazily():
    importers = sorted(
        module_name(path)
        for path in MODULES
        if any(target.split(".")[0] == GRPC_DRIVER for target in imports(path))
    )
    assert importers and all(within(name, {GRPC_CODEC}) for name in importers), importers
    for path in MODULES:
        if within(module_name(path), {GRPC_CODEC}):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        top_level = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        for node in top_level:
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            assert not any(within(str(name), {GRPC_CODEC, "tritonclient"}) for name in names), (
                f"{module_name(path)} imports {names} at import time"
            )


PLOTS = "service.plots"
PLOTS_IMPORTERS = {"service.reports", "service.cli", "service.serving.diagrams"}


def test_plots_are_imported_by_the_cli_side_and_the_diagram_use_case_only_and_lazily_by_the_latter():
    importers = {module_name(path) for path in MODULES if any(within(t, {PLOTS}) for t in imports(path))}
    assert importers <= PLOTS_IMPORTERS, sorted(importers - PLOTS_IMPORTERS)
    for path in MODULES:
        if module_name(path) in ("service.reports", "service.cli"):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        top_level = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        for node in top_level:
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            assert not any(within(str(name), {PLOTS, "matplotlib"}) for name in names), (
                f"{module_name(path)} imports {names} at import time"
            )


def test_nothing_imports_the_cli():
    importers = [
        module_name(path)
        for path in MODULES
        if module_name(path) not in ("service.cli", "service.__main__")
        and any(within(target, {"service.cli"}) for target in imports(path))
    ]
    assert not importers


def test_the_checker_sees_a_violation(tmp_path):
    # the check itself can fail: a core module importing the store is caught
    source = "from service.store import CalibratorStore\nimport fastapi\n"
    probe = tmp_path / "service" / "core" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(source)
    targets = imports(probe, "service.core.probe")
    assert "service.store" in targets and "fastapi" in targets
    _, allowed = rule("service.core.probe")
    assert not within("service.store", allowed | {"service.core"})
