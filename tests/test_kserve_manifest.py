"""deploy/kserve/inferenceservice.yaml against KServe's InferenceService CRD, vendored in deploy/kserve/schema/.

No cluster here: the manifest is validated with the CRD's own ``openAPIV3Schema`` (version ``v1beta1``) the way
``kubectl apply --validate=strict`` would judge it: :func:`tests.helpers.manifests.strict_schema` closes every
object schema, so that a misspelled field fails instead of being pruned (the helpers say why).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable
from typing import Any

import jsonschema_rs
import pytest

from tests.helpers.data import REPO
from tests.helpers.manifests import (
    INT_OR_STRING_ANY_OF,
    crd,
    dockerfile_entrypoint,
    image_uid,
    load_documents,
    rename,
    schema_errors,
    strict_schema,
    validator,
    vendored_source_problems,
)
from tests.helpers.manifests import published_schema as crd_schema

KSERVE = REPO / "deploy" / "kserve"
SCHEMA_DIR = KSERVE / "schema"
CRD = SCHEMA_DIR / "serving.kserve.io_inferenceservices.yaml"
MANIFEST = KSERVE / "inferenceservice.yaml"
STORE_CLAIM = KSERVE / "calibserve-store.yaml"

# The flags the transformer's arguments may use: calibserve's own and KServe's transformer arguments (aliases).
KNOWN_ARGUMENTS = {
    "serve",
    "--protocol",
    "--upstream",
    "--predictor_host",
    "--http_port",
    "--model_name",
    "--host",
    "--workers",
    "--store-dir",
    "--models-dir",
}
# What KServe appends to a custom transformer's arguments unless they already hold it (v0.20.0,
# pkg/apis/serving/v1beta1/transformer_custom.go); --workers only when containerConcurrency is set.
KSERVE_APPENDS = ("--model_name", "--predictor_host", "--http_port", "--workers")


def published_schema(version: str = "v1beta1") -> dict[str, Any]:
    """The CRD's ``openAPIV3Schema`` for ``version``, as published (a fresh copy each call)."""
    return crd_schema(CRD, version)


@functools.cache
def strict_validator() -> jsonschema_rs.Draft4Validator:
    return validator(strict_schema(published_schema()))


def errors(document: Any, check: jsonschema_rs.Draft4Validator | None = None) -> list[str]:
    """Every validation error as ``path: message`` (empty: valid)."""
    return schema_errors(document, check or strict_validator())


def manifests() -> list[dict[str, Any]]:
    return load_documents(MANIFEST)


def the_manifest() -> dict[str, Any]:
    (document,) = manifests()
    return document


def transformer_container(document: dict[str, Any]) -> dict[str, Any]:
    (container,) = document["spec"]["transformer"]["containers"]
    return container


# --- the vendored CRD --------------------------------------------------------------------------------------


def test_the_vendored_crd_is_the_file_source_md_names():
    problems = vendored_source_problems(
        SCHEMA_DIR,
        CRD.name,
        "https://github.com/kserve/kserve",
        "config/crd/full/serving.kserve.io_inferenceservices.yaml",
    )
    assert problems == []


def test_the_crd_is_kserves_inferenceservice_with_a_v1beta1_schema():
    document = crd(CRD)
    assert document["kind"] == "CustomResourceDefinition"
    assert document["spec"]["group"] == "serving.kserve.io"
    assert document["spec"]["names"]["kind"] == "InferenceService"
    schema = published_schema()
    spec = schema["properties"]["spec"]
    assert {"predictor", "transformer"} <= set(spec["properties"])
    assert spec["required"] == ["predictor"]


# --- the rewrite, on small schemas ------------------------------------------------------------------------


def small_validator(schema: dict[str, Any]) -> jsonschema_rs.Draft4Validator:
    return validator(strict_schema(schema))


def test_int_or_string_takes_an_integer_or_a_string_and_nothing_else():
    port = {"anyOf": INT_OR_STRING_ANY_OF, "x-kubernetes-int-or-string": True}
    quantity = {**port, "pattern": r"^[0-9]+(m|Mi|Gi)?$"}
    check = small_validator({"type": "object", "properties": {"port": port, "cpu": quantity}})
    for valid in ({"port": 8080}, {"port": "http1"}, {"cpu": 1}, {"cpu": "500m"}):
        assert check.is_valid(valid), valid
    for invalid in ({"port": 1.5}, {"port": True}, {"port": None}, {"port": [8080]}, {"cpu": "1 core"}):
        assert not check.is_valid(invalid), invalid
    # without anyOf (allowed for int-or-string by Kubernetes): the flag alone
    alone = small_validator({"type": "object", "properties": {"port": {"x-kubernetes-int-or-string": True}}})
    assert alone.is_valid({"port": 1}) and alone.is_valid({"port": "a"}) and not alone.is_valid({"port": 1.5})


def test_objects_with_properties_are_closed_maps_and_preserved_objects_stay_open():
    schema = {
        "type": "object",
        "properties": {
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "open": {"type": "object", "properties": {"a": {}}, "x-kubernetes-preserve-unknown-fields": True},
            "list": {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "string"}}}},
            "anything": {"type": "object"},
            "maybe": {"type": "string", "nullable": True},
        },
    }
    check = small_validator(schema)
    assert check.is_valid(
        {
            "closed": {"a": "x"},
            "labels": {"k": "v"},
            "open": {"b": 1},
            "list": [{"a": "x"}],
            "anything": {"z": 1},
        }
    )
    assert check.is_valid({"maybe": None}) and not check.is_valid({"maybe": 1})
    assert not check.is_valid({"unknown": 1})  # the root object too
    assert not check.is_valid({"closed": {"b": "x"}})
    assert not check.is_valid({"labels": {"k": 1}})
    assert not check.is_valid({"list": [{"a": "x"}, {"b": "x"}]})
    # the published (unrewritten) schema, as the API server treats it: unknown fields are not errors
    assert validator(schema).is_valid({"unknown": 1, "closed": {"b": "x"}})


def test_the_rewrite_leaves_defaults_and_enumerations_alone():
    schema = {
        "type": "object",
        "properties": {"mode": {"type": "string", "enum": ["a", "b"], "default": "a"}},
        "default": {"properties": {"x": 1}},
    }
    rewritten = strict_schema(schema)
    assert rewritten["default"] == {"properties": {"x": 1}}
    assert rewritten["properties"]["mode"]["enum"] == ["a", "b"]
    assert schema["properties"]["mode"] == {"type": "string", "enum": ["a", "b"], "default": "a"}  # a copy


def test_every_int_or_string_pair_of_the_crd_is_rewritten():
    rewritten = json.dumps(strict_schema(published_schema()))
    assert '"x-kubernetes-int-or-string": true' in rewritten
    assert json.dumps(INT_OR_STRING_ANY_OF) not in rewritten  # every controller-gen pair was replaced


# --- the manifest -----------------------------------------------------------------------------------------


def test_every_document_of_the_manifest_is_a_valid_v1beta1_inferenceservice():
    documents = manifests()
    assert documents
    for document in documents:
        assert document["apiVersion"] == "serving.kserve.io/v1beta1"
        assert document["kind"] == "InferenceService"
        # metadata is ObjectMeta, which the CRD leaves to the API server; KServe wants a DNS-1035 label
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", document["metadata"]["name"])
        assert len(document["metadata"]["name"]) <= 63
        assert errors(document) == []


# (id, how to break a copy of the manifest, the path the error must name)
BROKEN: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    (
        "misspelled transformer field",
        lambda d: rename(d["spec"]["transformer"], "minReplicas", "minReplica"),
        "spec.transformer",
    ),
    (
        "misspelled transformer containers",
        lambda d: rename(d["spec"]["transformer"], "containers", "container"),
        "spec.transformer",
    ),
    (
        "misspelled probe field",
        lambda d: rename(transformer_container(d), "readinessProbe", "readynessProbe"),
        "spec.transformer.containers.0",
    ),
    (
        "misspelled top-level spec field",
        lambda d: rename(d["spec"], "transformer", "transfomer"),
        "spec",
    ),
    (
        "replicas as a word",
        lambda d: d["spec"]["transformer"].update(minReplicas="one"),
        "spec.transformer.minReplicas",
    ),
    (
        "args as one string",
        lambda d: transformer_container(d).update(args="serve --protocol v2"),
        "spec.transformer.containers.0.args",
    ),
    (
        "an env value that YAML read as a number",
        lambda d: transformer_container(d)["env"][0].update(value=8080),
        "spec.transformer.containers.0.env.0.value",
    ),
    (
        "a probe port that is neither integer nor string",
        lambda d: transformer_container(d)["readinessProbe"]["httpGet"].update(port=8080.5),
        "spec.transformer.containers.0.readinessProbe.httpGet.port",
    ),
    (
        "a memory limit that is not a quantity",
        lambda d: transformer_container(d)["resources"]["limits"].update(memory="512 megabytes"),
        "spec.transformer.containers.0.resources.limits.memory",
    ),
    (
        "a container without its required name",
        lambda d: transformer_container(d).pop("name"),
        "spec.transformer.containers.0",
    ),
    ("no predictor (required)", lambda d: d["spec"].pop("predictor"), "spec"),
]


@pytest.mark.parametrize(("breakage", "where"), [(b, w) for _, b, w in BROKEN], ids=[i for i, _, _ in BROKEN])
def test_a_broken_copy_of_the_manifest_fails_validation_where_it_was_broken(breakage, where):
    document = copy.deepcopy(the_manifest())
    breakage(document)
    found = errors(document)
    assert found, "the broken copy passed validation"
    assert any(error.startswith(f"{where}: ") for error in found), found


def test_a_misspelled_field_passes_the_published_schema_which_is_why_the_test_closes_objects():
    document = copy.deepcopy(the_manifest())
    rename(document["spec"]["transformer"], "minReplicas", "minReplica")
    assert errors(document, validator(published_schema())) == []  # pruned by the API server, not rejected
    assert errors(document) != []


def test_int_or_string_fields_of_the_manifest_take_either_form():
    document = copy.deepcopy(the_manifest())
    container = transformer_container(document)
    container["readinessProbe"]["httpGet"]["port"] = "http1"  # the named container port
    container["resources"]["limits"]["cpu"] = 1
    container["resources"]["requests"]["memory"] = 268435456
    assert errors(document) == []


# --- the transformer's settings ---------------------------------------------------------------------------


def command_line_problems(container: dict[str, Any]) -> list[str]:
    """What is wrong with the command line the container runs (``command`` or the image's ENTRYPOINT, then
    ``args``) for a calibserve transformer; empty when nothing is."""
    argv = [*container.get("command", dockerfile_entrypoint()), *container.get("args", [])]
    problems = []
    if argv[:2] != ["calibserve", "serve"]:
        problems.append(f"runs {argv[:2]}, not calibserve serve")
    if argv.count("serve") != 1:
        problems.append(f"names serve {argv.count('serve')} times: {argv}")
    rest = argv[2:]
    for position, token in enumerate(rest):
        if token.startswith("-"):
            flag = token.split("=", 1)[0]
            if flag not in KNOWN_ARGUMENTS:
                problems.append(f"unknown flag {flag}")
        elif position == 0 or not rest[position - 1].startswith("-") or "=" in rest[position - 1]:
            problems.append(f"{token!r} is not the value of a flag")
    for flag in KSERVE_APPENDS:
        if flag not in KNOWN_ARGUMENTS:
            problems.append(f"KServe appends {flag}, which calibserve would refuse")
    return problems


def test_the_transformer_runs_calibserve_serve_with_known_flags_only():
    container = transformer_container(the_manifest())
    assert command_line_problems(container) == []
    args = container["args"]
    assert args[args.index("--protocol") + 1] == "v2"
    assert "containerConcurrency" not in the_manifest()["spec"]["transformer"]  # KServe: --workers N


@pytest.mark.parametrize(
    "container",
    [
        {"args": ["serve", "--protocol", "v2"]},  # the image's ENTRYPOINT already says serve
        {"command": ["calibserve"], "args": ["--protocol", "v2"]},  # no subcommand
        {"command": ["calibserve"], "args": ["serve", "--port", "8080"]},  # not a transformer flag
        {"command": ["calibserve"], "args": ["serve", "--protocol", "v2", "v3"]},  # a stray value
        {"command": ["calibserve"], "args": ["serve", "--protocol=v2", "v2"]},
    ],
)
def test_the_command_line_check_refuses_wrong_command_lines(container):
    assert command_line_problems(container) != []


def test_the_transformer_container_is_configured_for_kserve():
    document = the_manifest()
    transformer = document["spec"]["transformer"]
    container = transformer_container(document)
    assert container["name"] == "kserve-container"
    assert container["image"].startswith("calibserve")
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["CALIBSERVE_HOST"]["value"] == "0.0.0.0"
    assert env["CALIBSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"]
    assert "value" not in env["CALIBSERVE_API_KEYS"]  # never inline
    # the store directory is a mounted volume, the claim that calibserve-store.yaml creates
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volume_name = mounts[env["CALIBSERVE_STORE_DIR"]["value"]]
    (volume,) = [volume for volume in transformer["volumes"] if volume["name"] == volume_name]
    (claim,) = load_documents(STORE_CLAIM)
    assert claim["kind"] == "PersistentVolumeClaim"
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # the image's user (Dockerfile: useradd --uid 10001) can write the volume
    assert transformer["securityContext"]["fsGroup"] == image_uid()
    # probes on KServe's transformer port, which is the container's port
    (port,) = container["ports"]
    assert port["containerPort"] == 8080
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    assert container["resources"]["requests"] == {"cpu": "500m", "memory": "256Mi"}
    assert set(container["resources"]["limits"]) == {"cpu", "memory"}


def test_the_predictor_is_triton_speaking_v2():
    predictor = the_manifest()["spec"]["predictor"]
    assert predictor["model"]["modelFormat"]["name"] == "triton"
    assert predictor["model"]["protocolVersion"] == "v2"
    assert re.fullmatch(r"(gs|s3|pvc|https?)://\S+", predictor["model"]["storageUri"])


def test_the_readme_says_how_to_build_the_transformer_image_and_names_every_file():
    readme = (KSERVE / "README.md").read_text(encoding="utf-8")
    assert "--build-arg WITH_TORCH=0" in readme
    for path in sorted(KSERVE.iterdir()):
        if path.name != "README.md":
            assert f"`{path.name}" in readme, path.name
