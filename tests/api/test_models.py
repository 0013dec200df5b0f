"""Models CRUD, name validation and paging through the real app."""

from __future__ import annotations

import pytest

from tests.helpers.problems import assert_problem

BAD_NAMES = [".hidden", "a%2Fb", "..%2Fetc", "a\\b", "a%00b", "x" * 300, "-lead", "sp ace", "%2E%2E"]


def test_shipped_model_is_listed_and_described(client):
    body = client.get("/v1/models").json()
    names = [item["name"] for item in body["items"]]
    assert "digits-mlp" in names
    info = client.get("/v1/models/digits-mlp").json()
    assert info["kind"] == "torchscript" and info["num_classes"] == 10
    assert info["input_shape"] == [64] and info["class_names"][3] == "3"
    assert info["active_calibrator"] is None


def test_create_read_update_delete_logits_model(client, tmp_path):
    created = client.put("/v1/models/cifar10", json={"num_classes": 10, "description": "wrn"})
    assert created.status_code == 201, created.text  # created: 201; the same PUT again updates: 200
    assert created.json()["num_classes"] == 10 and created.json()["kind"] == "logits"
    assert (tmp_path / "store" / "cifar10" / "model.json").is_file()
    updated = client.put("/v1/models/cifar10", json={"num_classes": 10, "class_names": list("abcdefghij")})
    assert updated.status_code == 200, updated.text
    assert updated.json()["class_names"][0] == "a" and updated.json()["description"] == "wrn"
    assert client.delete("/v1/models/cifar10").status_code == 204
    assert not (tmp_path / "store" / "cifar10").exists()
    assert_problem(client.get("/v1/models/cifar10"), 404, "cifar10")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_model_names_are_refused_and_write_nothing(client, tmp_path, name):
    response = client.put(f"/v1/models/{name}", json={"num_classes": 3})
    assert_problem(response, 400, "invalid model name")
    store = tmp_path / "store"
    assert not store.exists() or not any(p for p in store.rglob("*") if not p.name.startswith(".")), list(
        store.rglob("*")
    )


def test_unknown_paths_under_a_valid_name_are_404(client):
    assert_problem(client.get("/v1/models/digits-mlp/nothing-here"), 404, "no route matches GET")


def test_bad_model_bodies(client):
    assert_problem(client.put("/v1/models/m", json={"num_classes": 0}), 422, "num_classes")
    assert_problem(client.put("/v1/models/m", content=b"{nope"), 400, "not valid JSON")
    assert_problem(client.put("/v1/models/m", json=[1, 2]), 400, "JSON object")
    assert_problem(
        client.put("/v1/models/m", json={"num_classes": 2, "class_names": ["a"]}), 400, "class_names"
    )
    assert_problem(client.put("/v1/models/m", json={"num_classes": 2, "surprise": 1}), 422, "surprise")


def test_paging_walks_every_model_once(client):
    for index in range(7):
        assert client.put(f"/v1/models/m{index}", json={"num_classes": 2}).status_code == 201
    seen, cursor = [], None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/models", params=params).json()
        assert len(page["items"]) <= 3
        seen += [item["name"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    assert {f"m{i}" for i in range(7)} | {"digits-mlp"} == set(seen)


def test_shipped_model_cannot_be_deleted_through_the_api(client):
    assert_problem(client.delete("/v1/models/digits-mlp"), 409, "models directory")
    assert client.get("/v1/models/digits-mlp").status_code == 200
