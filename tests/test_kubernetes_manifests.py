"""deploy/kubernetes/: the Kustomize base and overlays, rendered and validated offline, and held to the app.

No cluster here. :func:`render` resolves a kustomization the way ``kubectl kustomize`` does for the features the
manifests use (resources, directories of them, ``labels`` on metadata, ``namespace``, RFC 6902 ``patches``) and
refuses any other, so that a feature added later fails here instead of being skipped; where kubectl is installed
its output is compared with :func:`render`'s. Then:

- core kinds (Deployment, Service, ConfigMap, Secret, HPA, PDB, PVC) against Kubernetes' own OpenAPI schemas,
  bundled by ``kubernetes-validate``, in strict mode (an unknown field fails, as with
  ``kubectl apply --validate=strict``), for the oldest Kubernetes the manifests are written for and the newest
  the package knows;
- the ServiceMonitor against prometheus-operator's CRD, vendored in deploy/kubernetes/schema/, made strict the
  same way as KServe's (:func:`tests.helpers.manifests.strict_schema`);
- broken copies that must fail where they were broken;
- the manifests against the app: probe and scrape paths are routes, answered without a key; ports line up;
  every environment variable is a setting of ``service.config.Settings`` (or AWS's, or pending); selectors
  select; the pod is what the image and the server's shutdown need.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema_rs
import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from kubernetes_validate.utils import latest_version, major_minor

from service.api import create_app
from service.api.errors import allowed_methods
from service.config import Settings, parse_api_keys
from tests.helpers.data import REPO
from tests.helpers.manifests import (
    crd,
    dockerfile_entrypoint,
    image_environment,
    image_uid,
    load_documents,
    published_schema,
    rename,
    schema_errors,
    strict_crd_validator,
    validator,
    vendored_source_problems,
)

KUBERNETES = REPO / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
SHARED_VOLUME = KUBERNETES / "overlays" / "shared-volume"
KUSTOMIZATIONS = {"base": BASE, "shared-volume": SHARED_VOLUME}
SECRET_EXAMPLE = KUBERNETES / "examples" / "secret.example.yaml"
SCHEMA_DIR = KUBERNETES / "schema"
SERVICEMONITOR_CRD = SCHEMA_DIR / "monitoring.coreos.com_servicemonitors.yaml"

# The oldest Kubernetes the manifests are written for (lifecycle.preStop.sleep is beta, on by default, from
# 1.30; matchLabelKeys from 1.27), and the newest whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30", latest_version())

# Environment variables the manifests set for a setting calibserve does not have yet. Each must be a
# CALIBSERVE_ name that is not (yet) a field of service.config.Settings; once it is, it leaves this list.
# (CALIBSERVE_STORE_URL, the S3 store, was one; it is a setting now.)
PENDING_SETTINGS: set[str] = set()

# The AWS SDKs' standard environment variables (AWS SDKs and Tools reference guide) that an S3 client reads: a
# misspelled one would be ignored silently, and the store would go without credentials or region.
AWS_VARIABLES = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
    "AWS_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
}

# What the Kubernetes API accepts as a resource quantity (k8s.io/apimachinery/pkg/api/resource): a decimal
# number, then a binary suffix, a decimal suffix or a decimal exponent.
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
_QUANTITY_SUFFIX = {
    **{
        suffix: Decimal(1024) ** power
        for power, suffix in enumerate(["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"])
    },
    **{"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": Decimal(10**3)},
    **{"M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12), "P": Decimal(10**15)},
    "E": Decimal(10**18),
}


# --- rendering --------------------------------------------------------------------------------------------


class NotRendered(Exception):
    """The kustomization uses something :func:`render` does not do: teach it, or do without."""


KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "labels", "namespace", "patches"}


def render(directory: Path) -> list[dict[str, Any]]:
    """The documents ``kubectl kustomize directory`` prints (in another order), for the features listed in the
    module's docstring; :class:`NotRendered` for any other."""
    (kustomization,) = load_documents(directory / "kustomization.yaml")
    if kustomization.get("kind") != "Kustomization" or not str(kustomization.get("apiVersion")).startswith(
        "kustomize.config.k8s.io/"
    ):
        raise NotRendered(f"{directory}: not a Kustomization")
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    if unknown:
        raise NotRendered(f"{directory}: kustomization fields {sorted(unknown)}")
    documents: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            documents += render(path)
        elif path.is_file():
            documents += copy.deepcopy(load_documents(path))
        else:
            raise NotRendered(f"{directory}: resource {entry} (a remote one, or missing)")
    for patch in kustomization.get("patches", []):
        apply_patch(documents, directory, patch)
    if "namespace" in kustomization:
        for document in documents:
            document["metadata"]["namespace"] = kustomization["namespace"]
    for entry in kustomization.get("labels", []):
        # without includeSelectors/includeTemplates kustomize labels each resource's metadata only
        if set(entry) - {"pairs", "includeSelectors", "includeTemplates"}:
            raise NotRendered(f"{directory}: labels fields {sorted(entry)}")
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise NotRendered(f"{directory}: labels on selectors or templates")
        for document in documents:
            document["metadata"].setdefault("labels", {}).update(entry["pairs"])
    keys = [identity(document) for document in documents]
    if len(set(keys)) != len(keys):
        raise NotRendered(f"{directory}: a resource twice: {sorted(keys)}")
    return documents


def identity(document: dict[str, Any]) -> tuple[str, str]:
    return document["kind"], document["metadata"]["name"]


def apply_patch(documents: list[dict[str, Any]], directory: Path, patch: dict[str, Any]) -> None:
    """One entry of ``patches``: an RFC 6902 patch (``path`` or inline ``patch``) of the one resource its
    ``target`` (kind and name) names. Strategic merge patches are not rendered."""
    if set(patch) - {"path", "patch", "target"} or set(patch.get("target", {})) - {"kind", "name"}:
        raise NotRendered(f"{directory}: patch fields {patch}")
    if "path" in patch:
        (operations,) = load_documents(directory / patch["path"])
    else:
        operations = yaml.safe_load(patch["patch"])
    if not isinstance(operations, list):
        raise NotRendered(f"{directory}: a strategic merge patch ({patch.get('path', 'inline')})")
    target = patch["target"]
    matched = [d for d in documents if identity(d) == (target["kind"], target["name"])]
    if len(matched) != 1:
        raise NotRendered(f"{directory}: patch target {target} matches {len(matched)} resources")
    json_patch(matched[0], operations)


def json_patch(document: Any, operations: list[dict[str, Any]]) -> None:
    """RFC 6902 ``add``, ``remove`` and ``replace``, in place; a path that does not exist raises KeyError or
    IndexError (kustomize fails too)."""
    for operation in operations:
        *parents, last = [
            part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:]
        ]
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        op = operation["op"]
        if op == "add" and isinstance(node, list):
            value = copy.deepcopy(operation["value"])
            if last == "-":
                node.append(value)
            else:
                node.insert(int(last), value)
        elif op in ("add", "replace"):
            if op == "replace":
                _ = node[int(last)] if isinstance(node, list) else node[last]  # must exist
            node[int(last) if isinstance(node, list) else last] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            raise NotRendered(f"JSON patch operation {op}")


@functools.cache
def _rendered(name: str) -> list[dict[str, Any]]:
    return render(KUSTOMIZATIONS[name])


def rendered(name: str) -> list[dict[str, Any]]:
    """The documents of a kustomization of :data:`KUSTOMIZATIONS` (a fresh copy each call)."""
    return copy.deepcopy(_rendered(name))


def the(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (document,) = [d for d in documents if d["kind"] == kind]
    return document


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def secret_example() -> dict[str, Any]:
    (document,) = load_documents(SECRET_EXAMPLE)
    return document


def test_render_applies_patches_labels_and_namespace_and_refuses_what_it_does_not_do(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {A: a, B: b, L: x}\n"
    )
    (tmp_path / "base" / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [cm.yaml]\n"
        "labels: [{pairs: {team: t}}]\n"
    )
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "patch.yaml").write_text(
        "- {op: remove, path: /data/A}\n- {op: replace, path: /data/B, value: c}\n"
        "- {op: add, path: /data/a~1b, value: d}\n"
    )
    kustomization = (
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../base]\n"
        "namespace: ns\npatches: [{path: patch.yaml, target: {kind: ConfigMap, name: c}}]\n"
    )
    (overlay / "kustomization.yaml").write_text(kustomization)
    (document,) = render(overlay)
    assert document["data"] == {"B": "c", "L": "x", "a/b": "d"}
    assert document["metadata"] == {"name": "c", "namespace": "ns", "labels": {"team": "t"}}
    for unsupported in (
        "commonLabels: {a: b}\n",
        "images: [{name: calibserve, newTag: '1'}]\n",
        "configMapGenerator: [{name: x, literals: [a=b]}]\n",
        "labels: [{pairs: {a: b}, includeSelectors: true}]\n",
    ):
        (overlay / "kustomization.yaml").write_text(kustomization + unsupported)
        with pytest.raises(NotRendered):
            render(overlay)
    (overlay / "patch.yaml").write_text("metadata: {name: c}\ndata: {A: z}\n")  # a strategic merge patch
    (overlay / "kustomization.yaml").write_text(kustomization)
    with pytest.raises(NotRendered, match="strategic merge"):
        render(overlay)
    (overlay / "patch.yaml").write_text("- {op: remove, path: /data/missing}\n")
    with pytest.raises(KeyError):
        render(overlay)


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_render_agrees_with_kubectl_kustomize(name):
    # kubectl is not something the project installs: where it is missing, render() alone does the work.
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: render() is not compared with kubectl kustomize")
    printed = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZATIONS[name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    theirs = {identity(d): d for d in yaml.safe_load_all(printed) if d}
    ours = {identity(d): d for d in rendered(name)}
    assert sorted(ours) == sorted(theirs)
    for key, document in ours.items():
        assert document == theirs[key], key


def test_every_file_under_deploy_kubernetes_is_rendered_validated_or_documented():
    used: set[Path] = set()

    def walk(directory: Path) -> None:
        used.add(directory / "kustomization.yaml")
        (kustomization,) = load_documents(directory / "kustomization.yaml")
        for entry in kustomization.get("resources", []):
            path = (directory / entry).resolve()
            walk(path) if path.is_dir() else used.add(path)
        used.update((directory / patch["path"]).resolve() for patch in kustomization.get("patches", []))

    for directory in KUSTOMIZATIONS.values():
        walk(directory.resolve())
    used |= {SECRET_EXAMPLE.resolve()}
    yaml_files = {p.resolve() for p in KUBERNETES.rglob("*.yaml") if SCHEMA_DIR not in p.parents}
    assert yaml_files - used == set(), "a manifest no kustomization uses and no test validates"
    overlays = {p.parent for p in (KUBERNETES / "overlays").glob("*/kustomization.yaml")}
    assert overlays == {path for path in KUSTOMIZATIONS.values() if "overlays" in path.parts}


# --- validation -------------------------------------------------------------------------------------------


@functools.cache
def servicemonitor_validator() -> jsonschema_rs.Draft4Validator:
    return strict_crd_validator(SERVICEMONITOR_CRD, "v1")


def kubernetes_errors(document: dict[str, Any], version: str, *, strict: bool = True) -> list[str]:
    """kubernetes-validate's verdict (its first error, as ``path: message``; empty: valid)."""
    try:
        kubernetes_validate.validate(document, version, strict=strict)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(str(part) for part in error.path) or '<root>'}: {error.message}"]
    return []


def errors(document: dict[str, Any]) -> list[str]:
    """Every error of the document against its schema: the vendored CRD for a ServiceMonitor, else Kubernetes'
    own for each of :data:`KUBERNETES_VERSIONS` (a kind neither knows raises SchemaNotFoundError)."""
    if document.get("apiVersion") == "monitoring.coreos.com/v1":
        assert document["kind"] == crd(SERVICEMONITOR_CRD)["spec"]["names"]["kind"]
        return schema_errors(document, servicemonitor_validator())
    return sorted(
        {error for version in KUBERNETES_VERSIONS for error in kubernetes_errors(document, version)}
    )


def test_the_vendored_crd_is_the_file_source_md_names():
    problems = vendored_source_problems(
        SCHEMA_DIR,
        SERVICEMONITOR_CRD.name,
        "https://github.com/prometheus-operator/prometheus-operator",
        "example/prometheus-operator-crd-full/monitoring.coreos.com_servicemonitors.yaml",
    )
    assert problems == []


def test_the_crd_is_prometheus_operators_servicemonitor_v1():
    document = crd(SERVICEMONITOR_CRD)
    assert document["spec"]["group"] == "monitoring.coreos.com"
    assert document["spec"]["names"]["kind"] == "ServiceMonitor"
    spec = published_schema(SERVICEMONITOR_CRD, "v1")["properties"]["spec"]
    assert set(spec["required"]) == {"endpoints", "selector"}


def test_the_bundled_schemas_include_each_kubernetes_version_named():
    # validate() falls back to the newest schemas not newer than the version asked for: ask for bundled ones
    bundled = {major_minor(version) for version in kubernetes_validate.utils.all_versions()}
    assert {major_minor(version) for version in KUBERNETES_VERSIONS} <= bundled


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_rendered_document_is_valid(name):
    documents = rendered(name)
    kinds = sorted(d["kind"] for d in documents)
    expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    expected += ["ServiceMonitor", *(["PersistentVolumeClaim"] if name == "shared-volume" else [])]
    assert kinds == sorted(expected)
    for document in documents:
        # metadata is ObjectMeta, left open by both schemas: a name must be a DNS-1123 subdomain
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", document["metadata"]["name"])
        assert errors(document) == [], identity(document)


def test_the_secret_example_is_a_valid_secret():
    assert errors(secret_example()) == []


# (id, kind, how to break a copy, the path the error must name)
BROKEN: list[tuple[str, str, Callable[[dict[str, Any]], None], str]] = [
    (
        "misspelled container field",
        "Deployment",
        lambda d: rename(container_of(d), "readinessProbe", "readynessProbe"),
        "spec.template.spec.containers.0",
    ),
    ("misspelled spec field", "Deployment", lambda d: rename(d["spec"], "replicas", "replica"), "spec"),
    (
        "misspelled pod security field",
        "Deployment",
        lambda d: rename(d["spec"]["template"]["spec"]["securityContext"], "runAsNonRoot", "runAsNonroot"),
        "spec.template.spec.securityContext",
    ),
    ("replicas as a word", "Deployment", lambda d: d["spec"].update(replicas="two"), "spec.replicas"),
    (
        "container port as a string",
        "Deployment",
        lambda d: container_of(d)["ports"][0].update(containerPort="8000"),
        "spec.template.spec.containers.0.ports.0.containerPort",
    ),
    (
        "an env value that YAML read as a number",
        "Deployment",
        lambda d: container_of(d)["env"][1].update(value=8000),
        "spec.template.spec.containers.0.env.1.value",
    ),
    (
        "a probe port neither integer nor string",
        "Deployment",
        lambda d: container_of(d)["readinessProbe"]["httpGet"].update(port=8000.5),
        "spec.template.spec.containers.0.readinessProbe.httpGet.port",
    ),
    (
        "a container without its required name",
        "Deployment",
        lambda d: container_of(d).pop("name"),
        "spec.template.spec.containers.0",
    ),
    ("no selector (required)", "Deployment", lambda d: d["spec"].pop("selector"), "spec"),
    (
        "a service port as a string",
        "Service",
        lambda d: d["spec"]["ports"][0].update(port="80"),
        "spec.ports.0.port",
    ),
    (
        "a service port without its port",
        "Service",
        lambda d: d["spec"]["ports"][0].pop("port"),
        "spec.ports.0",
    ),
    (
        "a ConfigMap value that YAML read as a number",
        "ConfigMap",
        lambda d: d["data"].update(CALIBSERVE_WORKERS=1),
        "data.CALIBSERVE_WORKERS",
    ),
    (
        "misspelled HPA target field",
        "HorizontalPodAutoscaler",
        lambda d: rename(
            d["spec"]["metrics"][0]["resource"]["target"], "averageUtilization", "averageUtilisation"
        ),
        "spec.metrics.0.resource.target",
    ),
    (
        "an HPA without maxReplicas",
        "HorizontalPodAutoscaler",
        lambda d: d["spec"].pop("maxReplicas"),
        "spec",
    ),
    (
        "misspelled PDB selector",
        "PodDisruptionBudget",
        lambda d: rename(d["spec"]["selector"], "matchLabels", "matchLabel"),
        "spec.selector",
    ),
    (
        "misspelled ServiceMonitor endpoint field",
        "ServiceMonitor",
        lambda d: rename(d["spec"]["endpoints"][0], "interval", "intervall"),
        "spec.endpoints.0",
    ),
    (
        "a scrape interval that is not a duration",
        "ServiceMonitor",
        lambda d: d["spec"]["endpoints"][0].update(interval="15 seconds"),
        "spec.endpoints.0.interval",
    ),
    (
        "a ServiceMonitor port as a number (it names a Service port)",
        "ServiceMonitor",
        lambda d: d["spec"]["endpoints"][0].update(port=80),
        "spec.endpoints.0.port",
    ),
    (
        "a scheme that is not one",
        "ServiceMonitor",
        lambda d: d["spec"]["endpoints"][0].update(scheme="tcp"),
        "spec.endpoints.0.scheme",
    ),
    ("a ServiceMonitor without a selector", "ServiceMonitor", lambda d: d["spec"].pop("selector"), "spec"),
    (
        "misspelled ServiceMonitor spec field",
        "ServiceMonitor",
        lambda d: rename(d["spec"], "endpoints", "endpoint"),
        "spec",
    ),
]


@pytest.mark.parametrize(
    ("kind", "breakage", "where"), [(k, b, w) for _, k, b, w in BROKEN], ids=[i for i, _, _, _ in BROKEN]
)
def test_a_broken_copy_fails_validation_where_it_was_broken(kind, breakage, where):
    document = the(rendered("base"), kind)
    breakage(document)
    found = errors(document)
    assert found, "the broken copy passed validation"
    assert any(error.startswith(f"{where}: ") for error in found), found


def test_misspelled_fields_pass_the_lenient_schemas_which_is_why_validation_is_strict():
    deployment = the(rendered("base"), "Deployment")
    rename(container_of(deployment), "readinessProbe", "readynessProbe")
    assert kubernetes_errors(deployment, KUBERNETES_VERSIONS[-1], strict=False) == []
    assert errors(deployment) != []
    monitor = the(rendered("base"), "ServiceMonitor")
    rename(monitor["spec"]["endpoints"][0], "interval", "intervall")
    assert schema_errors(monitor, validator(published_schema(SERVICEMONITOR_CRD, "v1"))) == []
    assert errors(monitor) != []


def test_a_missing_core_kind_is_an_error_not_a_pass():
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
        errors({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


# --- quantities (kubernetes-validate takes any string) ------------------------------------------------------


def quantity(value: str | int | float) -> Decimal:
    text = str(value)
    if not QUANTITY.match(text):
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    number, suffix = re.match(r"^([+-]?[\d.]+)(.*)$", text).groups()
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        return Decimal(number) * Decimal(10) ** int(suffix[1:])
    return Decimal(number) * _QUANTITY_SUFFIX[suffix]


def test_quantities_parse_as_kubernetes_reads_them():
    assert quantity("500m") == Decimal("0.5") and quantity(2) == 2 and quantity("1Gi") == 1024**3
    assert quantity("512Mi") * 2 == quantity("1Gi") and quantity("1e3") == 1000 and quantity("10G") == 10**10
    for bad in ("1 gigabyte", "1GB", "0.5 cpu", "Mi", "", "1.2.3"):
        with pytest.raises(ValueError):
            quantity(bad)
    deployment = the(rendered("base"), "Deployment")
    container_of(deployment)["resources"]["limits"]["memory"] = "1 gigabyte"
    assert errors(deployment) == []  # why this test exists


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_quantity_parses_and_requests_stay_within_limits(name):
    documents = rendered(name)
    resources = container_of(the(documents, "Deployment"))["resources"]
    for amount in (*resources["requests"].values(), *resources["limits"].values()):
        quantity(amount)
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    for resource, request in resources["requests"].items():
        assert quantity(request) <= quantity(resources["limits"][resource]), resource
    for volume in the(documents, "Deployment")["spec"]["template"]["spec"]["volumes"]:
        if "emptyDir" in volume:
            quantity(volume["emptyDir"]["sizeLimit"])
    for claim in [d for d in documents if d["kind"] == "PersistentVolumeClaim"]:
        quantity(claim["spec"]["resources"]["requests"]["storage"])


# --- the manifests against the app ------------------------------------------------------------------------


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A container port by number or by name (as a probe or a Service's targetPort names it)."""
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in container["ports"]], port
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return found


def test_probe_and_scrape_paths_are_routes_of_the_app_answered_without_a_key(tmp_path):
    documents = rendered("base")
    container = container_of(the(documents, "Deployment"))
    paths = {probe["httpGet"]["path"] for probe in probes(container).values()}
    (endpoint,) = the(documents, "ServiceMonitor")["spec"]["endpoints"]
    assert paths == {"/healthz", "/readyz"} and endpoint["path"] == "/metrics"
    assert probes(container)["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes(container)["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # the app's own route table (catch-all routes, such as the fallback's, do not count)
    app = create_app(Settings(store_dir=tmp_path / "store", models_dir=None))
    for path in sorted({*paths, endpoint["path"]}):
        assert "GET" in allowed_methods(app, path), path
    assert allowed_methods(app, "/v1/models") and not allowed_methods(app, "/nothing-here")
    # kubelet and Prometheus send no key; the Secret configures keys, so every other route needs one
    settings = Settings(store_dir=tmp_path / "store", models_dir=None, api_keys="k:admin", auth="on")
    with TestClient(create_app(settings)) as client:
        for path in sorted({*paths, endpoint["path"]}):
            assert client.get(path).status_code == 200, path
        assert client.get("/v1/models").status_code == 401


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_ports_line_up_from_the_setting_to_the_service_and_the_scrape(name):
    documents = rendered(name)
    container = container_of(the(documents, "Deployment"))
    env = {variable["name"]: variable["value"] for variable in container["env"]}
    (http,) = container["ports"]
    assert http == {"name": "http", "containerPort": int(env["CALIBSERVE_PORT"]), "protocol": "TCP"}
    for kind, probe in probes(container).items():
        assert port_number(container, probe["httpGet"]["port"]) == http["containerPort"], kind
    service = the(documents, "Service")
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80 and port_number(container, port["targetPort"]) == http["containerPort"]
    (endpoint,) = the(documents, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == port["name"]  # a ServiceMonitor names the Service's port
    assert endpoint["interval"] == "15s" and endpoint["scheme"] == "http"


def environment_names(documents: list[dict[str, Any]]) -> dict[str, str]:
    """Every variable the manifests give the container: ``{name: where}``; envFrom's sources must exist (the
    ConfigMap in the rendering, the Secret as examples/secret.example.yaml)."""
    container = container_of(the(documents, "Deployment"))
    names = {variable["name"]: "env" for variable in container["env"]}
    secret = secret_example()
    for source in container["envFrom"]:
        if "configMapRef" in source:
            config = the(documents, "ConfigMap")
            assert source["configMapRef"]["name"] == config["metadata"]["name"]
            names.update(dict.fromkeys(config["data"], "ConfigMap"))
        else:
            assert source["secretRef"]["name"] == secret["metadata"]["name"]
            names.update(dict.fromkeys(secret["stringData"], "Secret"))
    return names


SETTINGS_VARIABLES = {f"CALIBSERVE_{field.upper()}" for field in Settings.model_fields}


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_environment_variable_is_a_setting_an_aws_variable_or_pending(name):
    names = environment_names(rendered(name))
    unknown = {
        variable: where
        for variable, where in names.items()
        if variable not in SETTINGS_VARIABLES | PENDING_SETTINGS | AWS_VARIABLES
    }
    assert unknown == {}, "neither a field of service.config.Settings nor an AWS SDK variable (a typo?)"
    assert {"CALIBSERVE_HOST", "CALIBSERVE_PORT", "CALIBSERVE_API_KEYS"} <= set(names)
    assert names["CALIBSERVE_API_KEYS"] == "Secret"  # never in the ConfigMap or inline
    assert names.get("AWS_SECRET_ACCESS_KEY", "Secret") == "Secret"


def test_pending_settings_are_still_pending():
    for variable in PENDING_SETTINGS:
        assert variable.startswith("CALIBSERVE_")
        assert variable not in SETTINGS_VARIABLES, (
            f"{variable} is a setting now: take it out of PENDING_SETTINGS"
        )


def container_environment(documents: list[dict[str, Any]], secret: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: the image's ENV, then envFrom in order, then
    env (each later one wins)."""
    container = container_of(the(documents, "Deployment"))
    environment = dict(image_environment())
    for source in container["envFrom"]:
        environment.update(the(documents, "ConfigMap")["data"] if "configMapRef" in source else secret)
    environment.update({variable["name"]: variable["value"] for variable in container["env"]})
    return environment


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_the_container_environment_makes_valid_settings_that_may_listen_on_every_address(name, monkeypatch):
    documents = rendered(name)
    secret = {**secret_example()["stringData"], "CALIBSERVE_API_KEYS": "a-real-key:admin,another:read"}
    environment = container_environment(documents, secret)
    for variable in [v for v in os.environ if v.startswith("CALIBSERVE_")]:
        monkeypatch.delenv(variable)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    settings = Settings()
    assert settings.host == "0.0.0.0" and settings.port == 8000 and settings.workers == 1
    assert settings.auth_enabled and settings.key_roles == {"a-real-key": "admin", "another": "read"}
    settings.check_bind_is_safe()
    container = container_of(the(documents, "Deployment"))
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    if name == "base":
        assert environment["CALIBSERVE_STORE_URL"].startswith("s3://")
        assert str(settings.store_dir) not in mounts  # the object store, once there, holds the calibrators
    else:
        assert "CALIBSERVE_STORE_URL" not in environment
        assert not [v for v in the(documents, "ConfigMap")["data"] if v.startswith("AWS_")]
        # the store directory is the shared claim, ReadWriteMany so that replicas on several nodes mount it
        volumes = {v["name"]: v for v in the(documents, "Deployment")["spec"]["template"]["spec"]["volumes"]}
        claim_name = volumes[mounts[str(settings.store_dir)]]["persistentVolumeClaim"]["claimName"]
        claim = the(documents, "PersistentVolumeClaim")
        assert claim["metadata"]["name"] == claim_name and claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_secret_example_holds_placeholders_that_calibserve_refuses():
    secret = secret_example()
    assert secret["type"] == "Opaque" and "data" not in secret  # stringData: readable placeholders
    assert set(secret["stringData"].values()) == {"REPLACE-ME"}
    with pytest.raises(ValueError, match="no role"):  # applied unchanged, the pods do not start
        parse_api_keys(secret["stringData"]["CALIBSERVE_API_KEYS"])
    for name in KUSTOMIZATIONS:  # never applied by kubectl apply -k
        assert "Secret" not in [document["kind"] for document in rendered(name)]


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_selectors_select_the_pods_and_the_service(name):
    documents = rendered(name)
    deployment = the(documents, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert set(deployment["spec"]["selector"]) == {"matchLabels"}
    assert selector.items() <= pod_labels.items()
    assert the(documents, "Service")["spec"]["selector"] == selector
    assert the(documents, "PodDisruptionBudget")["spec"]["selector"] == {"matchLabels": selector}
    for constraint in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert constraint["labelSelector"] == {"matchLabels": selector}
    target = the(documents, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert target == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    service = the(documents, "Service")
    monitor = the(documents, "ServiceMonitor")["spec"]
    assert set(monitor["selector"]) == {"matchLabels"} and "namespaceSelector" not in monitor  # its namespace
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # the kustomization's labels stay off selectors: a selector of a Deployment cannot change once applied
    for document in documents:
        assert document["metadata"]["labels"]["app.kubernetes.io/part-of"] == "calibserve", identity(document)
    assert "app.kubernetes.io/part-of" not in selector


def test_replicas_autoscaling_and_disruptions_agree():
    documents = rendered("base")
    deployment = the(documents, "Deployment")
    hpa = the(documents, "HorizontalPodAutoscaler")["spec"]
    assert deployment["spec"]["replicas"] == hpa["minReplicas"] == 2 and hpa["maxReplicas"] == 10
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    assert "cpu" in container_of(deployment)["resources"]["requests"]  # utilisation is of the request
    pdb = the(documents, "PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1 < hpa["minReplicas"]  # a drain can always evict one pod
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def graceful_shutdown_seconds() -> int:
    """uvicorn's ``timeout_graceful_shutdown`` as ``calibserve serve`` sets it (service/api/server.py)."""
    source = (REPO / "service" / "api" / "server.py").read_text(encoding="utf-8")
    (seconds,) = re.findall(r'"timeout_graceful_shutdown":\s*(\d+)', source)
    return int(seconds)


def test_the_pod_is_given_time_to_drain_and_shut_down():
    deployment = the(rendered("base"), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = container_of(deployment)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert graceful_shutdown_seconds() == 30 and pod["terminationGracePeriodSeconds"] == 40
    assert pod["terminationGracePeriodSeconds"] > pre_stop + graceful_shutdown_seconds()


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_the_pod_runs_the_image_as_its_user_restricted_with_tmp_its_only_writable_path(name):
    deployment = the(rendered(name), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = container_of(deployment)
    # the image's command (its ENTRYPOINT), said explicitly; no arguments: settings come from the environment
    assert container["command"] == dockerfile_entrypoint() == ["calibserve", "serve"]
    assert "args" not in container and container["image"] == "calibserve:latest"
    # Pod Security Standards, restricted profile
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == security["runAsGroup"] == security["fsGroup"] == image_uid()
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["automountServiceAccountToken"] is False
    # read-only root: /tmp (the port's lock file, PROMETHEUS_MULTIPROC_DIR with several workers) is an
    # emptyDir; nothing moves the temporary directory elsewhere
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    environment = container_environment(rendered(name), {})
    assert not {"TMPDIR", "TEMP", "TMP", "PROMETHEUS_MULTIPROC_DIR"} & set(environment)
    expected = {"/tmp"} | ({"/data"} if name == "shared-volume" else set())
    assert set(mounts) == expected
    assert all(not mount.get("readOnly") for mount in container["volumeMounts"])


def test_pods_spread_across_nodes_and_zones():
    pod = the(rendered("base"), "Deployment")["spec"]["template"]["spec"]
    keys = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert set(keys) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in keys.values():
        # ScheduleAnyway: a single-node cluster still runs both replicas
        assert constraint["maxSkew"] == 1 and constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]  # spread each rollout's pods


# --- the README -------------------------------------------------------------------------------------------


def test_the_readme_names_every_file_and_says_what_is_pending():
    readme = (KUBERNETES / "README.md").read_text(encoding="utf-8")
    for path in sorted(KUBERNETES.rglob("*")):
        if path.is_file() and path.name != "README.md":
            assert f"`{path.relative_to(KUBERNETES)}`" in readme or f"`{path.name}`" in readme, path
    for needed in (
        "Kustomize",
        "Helm",
        "CALIBSERVE_STORE_URL",
        "S3 store",
        "ReadWriteMany",
        "kubectl apply -k",
    ):
        assert needed in readme, needed
