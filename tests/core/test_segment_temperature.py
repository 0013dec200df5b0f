"""Temperature scaling per segment, shrunk towards the global temperature (issue #15, library half)."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from service.core import metrics
from service.core.calibrators import TemperatureScaling
from service.core.calibrators.segment_temperature import SegmentTemperatureScaling
from service.errors import InvalidInput, NotFitted


@pytest.fixture(scope="module")
def data():
    """Segment "b" has logits three times too large; "small" has 30 rows."""
    rng = np.random.default_rng(0)
    n = 4000
    logits = rng.normal(0.0, 3.0, size=(n, 4))
    labels = (logits / 2 + rng.gumbel(size=logits.shape)).argmax(axis=1)
    segments = np.array(["a", "b"])[rng.integers(0, 2, n)].astype(object)
    segments[:30] = "small"
    logits[segments == "b"] *= 3.0
    return logits, labels, segments.tolist()


def own_temperature(logits, labels, segments, key) -> float:
    rows = np.array(segments) == key
    return TemperatureScaling().fit(logits[rows], labels[rows]).temperature_


def test_without_a_prior_each_segment_gets_its_own_optimum(data):
    logits, labels, segments = data
    calibrator = SegmentTemperatureScaling(prior_strength=0.0).fit(logits, labels, segments)
    for key in ("a", "b", "small"):
        assert calibrator.segment_temperatures_[key] == pytest.approx(
            own_temperature(logits, labels, segments, key), rel=1e-6
        )
    assert calibrator.temperature_ == pytest.approx(TemperatureScaling().fit(logits, labels).temperature_)


def test_the_prior_shrinks_small_segments_most(data):
    logits, labels, segments = data
    own = {key: own_temperature(logits, labels, segments, key) for key in ("a", "b", "small")}
    calibrator = SegmentTemperatureScaling().fit(logits, labels, segments)
    glob = calibrator.temperature_
    for key, temperature in calibrator.segment_temperatures_.items():
        # between the segment's own optimum and the global one (in log T)
        low, high = sorted((math.log(own[key]), math.log(glob)))
        assert low - 1e-9 <= math.log(temperature) <= high + 1e-9, key
    share = {
        key: abs(math.log(calibrator.segment_temperatures_[key] / own[key])) / abs(math.log(glob / own[key]))
        for key in own
    }
    assert share["small"] > 0.5 > share["a"] and share["b"] < 0.1  # 30 rows move far, ~2,000 barely
    huge = SegmentTemperatureScaling(prior_strength=1e12).fit(logits, labels, segments)
    assert all(t == pytest.approx(huge.temperature_, rel=1e-6) for t in huge.segment_temperatures_.values())


def test_per_segment_temperatures_fix_the_miscalibrated_segment(data):
    logits, labels, segments = data
    calibrator = SegmentTemperatureScaling().fit(logits, labels, segments)
    probabilities, fallback = calibrator.transform_segments(logits, segments)
    assert not fallback.any()
    rows = np.array(segments) == "b"
    single = TemperatureScaling().fit(logits, labels).transform(logits)
    assert metrics.expected_calibration_error(probabilities[rows], labels[rows]) < 0.5 * (
        metrics.expected_calibration_error(single[rows], labels[rows])
    )
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-12)
    assert (probabilities.argmax(axis=1) == logits.argmax(axis=1)).all()  # temperature keeps the argmax


def test_unknown_segments_fall_back_to_the_global_temperature_and_say_so(data):
    logits, labels, segments = data
    calibrator = SegmentTemperatureScaling().fit(logits, labels, segments)
    probabilities, fallback = calibrator.transform_segments(logits[:4], ["a", "unseen", None, "b"])
    assert fallback.tolist() == [False, True, True, False]
    expected = np.exp(logits[1] / calibrator.temperature_)
    np.testing.assert_allclose(probabilities[1], expected / expected.sum(), rtol=1e-12)


def test_one_document_round_trips_through_json(data):
    logits, labels, segments = data
    calibrator = SegmentTemperatureScaling(prior_strength=50).fit(logits, labels, segments)
    document = orjson.loads(orjson.dumps(calibrator.to_dict()))
    again = SegmentTemperatureScaling.from_dict(document)
    assert again.segment_temperatures_ == calibrator.segment_temperatures_
    assert document["temperature"] == calibrator.temperature_
    np.testing.assert_array_equal(
        again.transform_segments(logits[:50], segments[:50])[0],
        calibrator.transform_segments(logits[:50], segments[:50])[0],
    )
    bad = {**document, "params": {**document["params"], "segment_temperatures": {"a": -1.0}}}
    with pytest.raises(InvalidInput, match="segment_temperatures"):
        SegmentTemperatureScaling.from_dict(bad)
    with pytest.raises(NotFitted):
        SegmentTemperatureScaling().transform_segments(logits[:2], ["a", "b"])
    with pytest.raises(InvalidInput, match="prior_strength"):
        SegmentTemperatureScaling(prior_strength=-1)
