"""Crash consistency: SIGKILL a two-worker server at random moments while clients fit and activate.

After every kill the server is restarted on the same store, and the store must hold its promises:

- every version file parses (no torn writes) and names its model and number; every number has its marker;
- every ``active`` pointer names an existing version;
- every fit acknowledged with a 2xx before the kill is there, byte-for-byte the document it returned;
- a version number, once seen on disk, keeps exactly its document for the rest of the run (never reused,
  never rewritten), and the numbers handed out in acknowledgements are unique;
- calibrate answers with the active version on disk, as ``softmax(z / T)`` with that version's T.

``make test`` kills 3 times; ``make soak`` 100 times.
"""

from __future__ import annotations

import random
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers.figures import record_figures
from tests.helpers.numerics import softmax_t
from tests.helpers.stores import check_store

MODELS = ("alpha", "beta", "gamma")
CLIENT_THREADS = 4


@dataclass
class Ledger:
    """What clients were told: acknowledged fits, and every version number seen on disk so far."""

    acknowledged: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    seen: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(url: str, seed: int, data: dict, ledger: Ledger, stop: threading.Event) -> None:
    """Fit (mostly activating) and activate acknowledged versions until the server dies or ``stop``."""
    rng = random.Random(seed)
    logits, labels = data["fit_logits"], data["fit_labels"]
    with httpx.Client(base_url=url, timeout=30.0) as http:
        while not stop.is_set():
            model = rng.choice(MODELS)
            try:
                with ledger.lock:
                    known = [version for name, version, _ in ledger.acknowledged if name == model]
                if known and rng.random() < 0.2:
                    response = http.post(f"/v1/models/{model}/calibrators/{rng.choice(known)}/activate")
                    if response.status_code != 200:
                        ledger.unexpected.append(f"activate: {response.status_code} {response.text}")
                    continue
                rows = np.sort(rng.sample(range(len(labels)), rng.randint(40, len(labels))))
                response = http.post(
                    f"/v1/models/{model}/fit",
                    json={
                        "logits": logits[rows].tolist(),
                        "labels": labels[rows].tolist(),
                        "activate": rng.random() < 0.75,
                    },
                )
            except httpx.HTTPError:
                return  # the server was killed under this request: it is not acknowledged
            except Exception as exc:  # anything else must fail the test, not end this thread quietly
                ledger.unexpected.append(repr(exc))
                return
            if response.status_code != 201:
                ledger.unexpected.append(f"fit: {response.status_code} {response.text}")
                continue
            document = response.json()
            with ledger.lock:
                ledger.acknowledged.append((model, document["version"], document))


def verify(server, store, ledger: Ledger, data: dict) -> int:
    """Check every promise after a restart; return how many versions the store holds."""
    state = check_store(store)
    for model, version, document in ledger.acknowledged:
        stored = state[model]["versions"].get(version)
        assert stored == document, f"acknowledged fit {model} v{version} is missing or differs on disk"
    pairs = [(model, version) for model, version, _ in ledger.acknowledged]
    assert len(pairs) == len(set(pairs)), "a version number was acknowledged twice"
    for model, entry in state.items():
        for version, document in entry["versions"].items():
            before = ledger.seen.setdefault((model, version), document)
            assert before == document, f"{model} v{version} changed on disk: a version number was reused"
    for model, version in ledger.seen:
        assert version in state[model]["versions"], f"{model} v{version} vanished"

    rows = data["logits"][:5]
    with server.client() as http:
        for model in MODELS:
            active = state[model]["active"]
            for _ in range(4):  # several requests, so that both workers answer
                answer = http.post(f"/v1/models/{model}/calibrate", json={"logits": rows.tolist()})
                assert answer.status_code == 200, answer.text
                body = answer.json()
                assert body["calibrator_version"] == active
                if active is not None:
                    temperature = state[model]["versions"][active]["temperature"]
                    np.testing.assert_allclose(body["probabilities"], softmax_t(rows, temperature), rtol=1e-9)
            if active is not None:
                served = http.get(f"/v1/models/{model}/calibrators/{active}").json()
                assert served == state[model]["versions"][active]
    return sum(len(entry["versions"]) for entry in state.values())


@pytest.mark.timeout(3600)
def test_sigkill_at_random_moments_loses_and_tears_nothing(tmp_path, servers, digits_logits, soak):
    kills = 100 if soak else 3
    # quick: the same kill moments and client operations every run (make test is no lottery); soak: fresh ones
    seed = random.SystemRandom().randrange(2**32) if soak else 20260
    rng = random.Random(seed)
    store = tmp_path / "store"
    ledger = Ledger()
    server = servers(store, workers=2)
    with server.client() as http:
        for model in MODELS:
            assert http.put(f"/v1/models/{model}", json={"num_classes": 10}).status_code == 201
    for cycle in range(kills):
        stop = threading.Event()
        clients = [
            threading.Thread(
                target=client_loop, args=(server.url, rng.randrange(2**32), digits_logits, ledger, stop)
            )
            for _ in range(CLIENT_THREADS)
        ]
        for thread in clients:
            thread.start()
        # a random moment inside the clients' work; Event.wait is the clock, not a fixed sleep
        stop.wait(rng.uniform(0.05, 1.5))
        server.stop(signal.SIGKILL)
        stop.set()
        for thread in clients:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in clients)
        assert not ledger.unexpected, ledger.unexpected[:3]
        server = servers(store, workers=2)
        try:
            versions = verify(server, store, ledger, digits_logits)
        except AssertionError as exc:
            raise AssertionError(f"after kill {cycle + 1} (seed {seed}): {exc}") from exc
    record_figures(
        "crash" + ("-soak" if soak else ""),
        kills_survived=kills,
        acknowledged_fits=len(ledger.acknowledged),
        versions_on_disk=versions,
        seed=seed,
    )
    assert len(ledger.acknowledged) >= kills  # the clients did work in (nearly) every cycle
