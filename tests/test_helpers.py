"""The shared comparison helpers pass what float32 rounding explains and fail what it does not."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.numerics import EPS32, assert_float32_close, assert_softmax_close, softmax_t


def ulps_away(values: np.ndarray, ulps: int) -> np.ndarray:
    """``values`` (float32) moved ``ulps`` units in the last place away from zero."""
    moved = values.astype(np.float32)
    for _ in range(ulps):
        moved = np.nextafter(moved, np.copysign(np.float32(np.inf), moved))
    return moved


def test_float32_logits_a_few_ulps_apart_pass_and_a_wrong_row_fails():
    logits = np.array([[45.0, -3.0, 0.001], [1.0, 2.0, 3.0]], dtype=np.float32)
    # issue #10: 4 ulps at |z| = 45 on another CPU
    assert_float32_close(ulps_away(logits, 4), logits, ulps=16)
    # near 0 in a row of magnitude 45 the rounding is the row's: 8 ulps of 45 is fine at 0.001
    shifted = logits.copy()
    shifted[0, 2] += np.float32(8 * EPS32 * 45)
    assert_float32_close(shifted, logits, ulps=16)
    wrong = logits.copy()
    wrong[1, 0] += 1e-3
    with pytest.raises(AssertionError, match="1 of 6 elements"):
        assert_float32_close(wrong, logits, ulps=16)
    with pytest.raises(AssertionError):
        assert_float32_close(logits[:, ::-1], logits, ulps=16)


def test_softmax_of_rounded_logits_passes_and_another_temperature_fails():
    logits = np.array([[12.0, -30.0, 4.0], [0.5, 0.25, 0.0]], dtype=np.float32)
    expected = softmax_t(logits, 2.0)
    assert_softmax_close(softmax_t(ulps_away(logits, 8), 2.0), expected, logits, ulps=16, temperature=2.0)
    with pytest.raises(AssertionError, match="softmax"):
        assert_softmax_close(softmax_t(logits, 2.001), expected, logits, ulps=16, temperature=2.0)
    # tiny probabilities are held relative to themselves, not to 1
    assert expected[0, 1] < 1e-9
    bumped = expected.copy()
    bumped[0, 1] *= 1.01
    with pytest.raises(AssertionError):
        assert_softmax_close(bumped, expected, logits, ulps=16, temperature=2.0)


@pytest.mark.parametrize("worker", ["gw0", "gw3"])
def test_each_xdist_worker_takes_ports_from_a_block_of_its_own(monkeypatch, worker):
    import socket

    from tests.helpers import ports

    if ports._ephemeral_start() < ports.FIRST + 4 * ports.BLOCK:
        pytest.skip("this kernel's ephemeral ports start below the workers' blocks: plain bind(0) serves")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    block = ports._block()
    assert block is not None and block.start == ports.FIRST + int(worker[2:]) * ports.BLOCK
    assert block.stop <= ports._ephemeral_start()  # no outgoing connection is handed one of them
    port = ports.free_port()
    assert port in block
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    # a server's HTTP and gRPC ports are picked before it binds either: picks in a row never repeat
    monkeypatch.setattr(ports, "_handed_out", set())
    picks = [ports.free_port() for _ in range(ports.BLOCK // 4)]
    assert len(set(picks)) == len(picks) and set(picks) <= set(block)
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert ports._block() is None and 0 < ports.free_port() < 65536
