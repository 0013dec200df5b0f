"""The test suite's own conventions: helpers are imported from tests/helpers, never from a conftest."""

from __future__ import annotations

import ast

import pytest

from tests.helpers.data import REPO

TESTS = REPO / "tests"


def conftest_imports(source: str) -> list[str]:
    """Imports of a conftest module as a library (``from tests.conftest import x``, ``from .conftest ...``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [alias.name for alias in node.names]
            if module.split(".")[-1] == "conftest" or "conftest" in names:
                found.append(f"from {'.' * node.level}{module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[-1] == "conftest"]
    return found


def test_conftest_imports_are_recognised():
    assert conftest_imports("from tests.api.conftest import assert_problem")
    assert conftest_imports("from .conftest import x")
    assert conftest_imports("from . import conftest")
    assert conftest_imports("import tests.conftest")
    assert not conftest_imports("from tests.helpers.problems import assert_problem\n# from tests.conftest")


@pytest.mark.parametrize("path", sorted(TESTS.rglob("*.py")), ids=lambda path: str(path.relative_to(REPO)))
def test_no_module_imports_a_conftest(path):
    assert conftest_imports(path.read_text(encoding="utf-8")) == [], "move what it needs to tests/helpers"


def test_helpers_is_a_plain_package_without_fixtures():
    helpers = TESTS / "helpers"
    assert (helpers / "__init__.py").is_file()
    for path in sorted(helpers.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        assert "pytest.fixture" not in source, f"{path.name}: fixtures belong in a conftest.py"
