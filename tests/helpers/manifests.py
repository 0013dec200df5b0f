"""Kubernetes manifests judged offline: YAML documents, vendored CRD schemas made strict, the image's facts.

Shared by ``tests/test_kserve_manifest.py`` (KServe's InferenceService CRD) and
``tests/test_kubernetes_manifests.py`` (prometheus-operator's ServiceMonitor CRD). A CRD schema is structural:
the API server prunes fields it does not know instead of rejecting them, so the schema as published accepts a
misspelled field (and drops it silently). Strict field validation (``kubectl apply --validate=strict``) rejects
unknown fields instead; :func:`strict_schema` mirrors that by closing every object schema that lists
``properties`` and does not set ``x-kubernetes-preserve-unknown-fields``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import yaml

from tests.helpers.data import REPO

DOCKERFILE = REPO / "Dockerfile"

# The pair controller-gen writes for an int-or-string field beside x-kubernetes-int-or-string: true
INT_OR_STRING_ANY_OF = [{"type": "integer"}, {"type": "string"}]

# Keywords whose values are data (defaults, enumerations), not schemas: never rewritten.
_DATA_KEYWORDS = {"default", "enum", "example"}


def load_documents(path: Path) -> list[Any]:
    """Every non-empty YAML document of ``path`` (the C loader when there is one: it reads a 2 MB CRD in
    under a second)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open(encoding="utf-8") as stream:
        return [document for document in yaml.load_all(stream, Loader=loader) if document is not None]


@functools.cache
def crd(path: Path) -> dict[str, Any]:
    """The one CustomResourceDefinition of ``path`` (read once; callers must not change it)."""
    (document,) = load_documents(path)
    assert document["kind"] == "CustomResourceDefinition", path
    return document


def published_schema(path: Path, version: str) -> dict[str, Any]:
    """The CRD's ``openAPIV3Schema`` for ``version``, as published (a fresh copy each call)."""
    (found,) = [v for v in crd(path)["spec"]["versions"] if v["name"] == version]
    return copy.deepcopy(found["schema"]["openAPIV3Schema"])


def strict_schema(schema: Any) -> Any:
    """A CRD's OpenAPI v3 schema rewritten into JSON Schema (draft 4) that judges like ``--validate=strict``.

    - ``x-kubernetes-int-or-string: true``: an integer or a string (``type: [integer, string]``; the
      ``anyOf`` pair controller-gen writes beside it is dropped, other keywords such as a quantity's
      ``pattern``, which applies to strings only, are kept).
    - ``nullable: true``: ``null`` allowed too (OpenAPI's keyword; JSON Schema has no such thing).
    - an object schema with ``properties``, no ``additionalProperties`` and no
      ``x-kubernetes-preserve-unknown-fields``: ``additionalProperties: false``. This is the strict part: the
      API server would prune such a field, kubectl's strict validation rejects it. Maps (``additionalProperties``
      given) and objects without ``properties`` (``metadata``: ObjectMeta, checked by the API server itself)
      stay open.
    """
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    rewritten = {}
    for key, value in schema.items():
        if key in _DATA_KEYWORDS:
            rewritten[key] = value
        elif key == "properties":
            rewritten[key] = {name: strict_schema(sub) for name, sub in value.items()}
        else:
            rewritten[key] = strict_schema(value)
    if rewritten.get("x-kubernetes-int-or-string"):
        if rewritten.get("anyOf") == INT_OR_STRING_ANY_OF:
            del rewritten["anyOf"]
        rewritten["type"] = ["integer", "string"]
    if rewritten.get("nullable") and "type" in rewritten:
        types = rewritten["type"] if isinstance(rewritten["type"], list) else [rewritten["type"]]
        rewritten["type"] = [*types, "null"]
    if (
        "properties" in rewritten
        and "additionalProperties" not in rewritten
        and not rewritten.get("x-kubernetes-preserve-unknown-fields")
    ):
        rewritten["additionalProperties"] = False
    return rewritten


def validator(schema: dict[str, Any]) -> jsonschema_rs.Draft4Validator:
    # OpenAPI 3.0's schema object is draft-4 shaped (boolean exclusiveMinimum and friends). Formats (int32,
    # int64, byte, date-time) are not checked: the manifests set no field where one would matter.
    return jsonschema_rs.Draft4Validator(schema, validate_formats=False)


def strict_crd_validator(path: Path, version: str) -> jsonschema_rs.Draft4Validator:
    """A validator of the CRD's ``version`` that rejects unknown fields (:func:`strict_schema`)."""
    return validator(strict_schema(published_schema(path, version)))


def schema_errors(document: Any, check: jsonschema_rs.Draft4Validator) -> list[str]:
    """Every validation error as ``path: message`` (empty: valid)."""
    return [
        f"{'.'.join(str(part) for part in error.instance_path) or '<root>'}: {error.message}"
        for error in check.iter_errors(document)
    ]


def rename(mapping: dict[str, Any], old: str, new: str) -> None:
    """Rename a key in place (a broken copy's misspelled field)."""
    mapping[new] = mapping.pop(old)


def vendored_source_problems(schema_dir: Path, file_name: str, repository: str, path: str) -> list[str]:
    """What ``schema_dir/SOURCE.md`` fails to say about the vendored ``file_name`` (empty: all of it).

    SOURCE.md is a table with the file's ``sha256`` (checked against the file), the repository, the path in
    it, a release ``tag`` (``vX.Y.Z``, not a release candidate) and the tag's ``commit``; ``LICENSE`` beside it
    is the repository's Apache-2.0 licence.
    """
    source = (schema_dir / "SOURCE.md").read_text(encoding="utf-8")
    digest = hashlib.sha256((schema_dir / file_name).read_bytes()).hexdigest()
    problems = []
    if f"sha256 | `{digest}`" not in source:
        problems.append(f"{file_name} changed (sha256 {digest}): update SOURCE.md and say where it came from")
    problems += [f"SOURCE.md does not name {needed}" for needed in (repository, path) if needed not in source]
    if not re.search(r"tag \| `v\d+\.\d+\.\d+`", source):
        problems.append("SOURCE.md names no release tag vX.Y.Z")
    if not re.search(r"commit \| `[0-9a-f]{40}`", source):
        problems.append("SOURCE.md names no commit")
    licence = (schema_dir / "LICENSE").read_text(encoding="utf-8")
    if not ("Apache License" in licence and "Version 2.0, January 2004" in licence):
        problems.append("LICENSE is not the Apache License 2.0")
    return problems


def dockerfile_entrypoint() -> list[str]:
    """The image's ``ENTRYPOINT`` (exec form)."""
    (entrypoint,) = re.findall(r"^ENTRYPOINT (\[.*\])$", DOCKERFILE.read_text(encoding="utf-8"), re.M)
    return json.loads(entrypoint)


def image_uid() -> int:
    """The uid of the image's user (``useradd --uid``), which a pod's ``runAsUser``/``fsGroup`` must name."""
    return int(re.search(r"--uid (\d+)", DOCKERFILE.read_text(encoding="utf-8")).group(1))


def image_environment() -> dict[str, str]:
    """The image's ``ENV`` (``KEY=value`` pairs, continued lines included): what a container starts with."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    env = {}
    for line in re.findall(r"^ENV (.+)$", text, re.M):
        env.update(dict(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", line)))
    return env
