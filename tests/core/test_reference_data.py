"""The real classifier outputs of tests/data reproduce the reference figures of tests/data/README.md.

Before: the raw logits of the test half. After: temperature scaling fitted on the val half, with the
README's temperature (given to 5 decimals) and, when the calibrators module exists, with a fitted one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.core import metrics
from service.core.probability import softmax

# file: (T, error %, (ece, mce, nll, brier) before, (ece, mce, nll, brier) after), from tests/data/README.md
REFERENCE = {
    "netcal_wrn16-4_c10.npz": (
        2.03915,
        8.94,
        (0.055219, 0.321881, 0.383129, 0.145812),
        (0.006447, 0.098878, 0.276111, 0.132428),
    ),
    "netcal_lenet5_c10.npz": (
        1.37627,
        47.84,
        (0.116628, 0.189227, 1.392503, 0.623866),
        (0.023070, 0.168996, 1.328826, 0.605458),
    ),
    "netcal_densenet-bc-100_c100.npz": (
        2.15776,
        24.02,
        (0.137539, 0.358826, 1.163642, 0.372610),
        (0.011378, 0.075151, 0.846913, 0.329943),
    ),
    "kumar_vgg16_c10.npz": (
        1.70262,
        6.08,
        (0.040243, 0.297919, 0.245448, 0.100901),
        (0.012688, 0.243226, 0.192989, 0.092615),
    ),
}
REFERENCE_FILES = tuple(REFERENCE)
FIGURES = ("ece", "mce", "nll", "brier")
# The README prints the figures to 6 decimals: a printed value is within half a unit of the last digit (5e-7)
# of the exact one, an absolute bound that holds whatever the figure's magnitude. Ours are float64 sums over
# float32 logits (exact in float64): their own rounding (~1e-15) is far below that. The README's T, printed
# to 5 decimals, moves the figures by up to 8e-7 more.
ROUNDING = 1e-6
WITH_ROUNDED_T = 2e-6


def assert_printed(actual: tuple[float, ...], printed: tuple[float, ...], within: float) -> None:
    """Each figure equals its printed (rounded) value: ``|actual - printed| <= within``."""
    for name, value, shown in zip(FIGURES, actual, printed, strict=True):
        assert abs(value - shown) <= within, f"{name}: {value!r} is not {shown} to within {within}"


def test_reference_table_covers_every_data_file() -> None:
    data_dir = Path(__file__).parents[1] / "data"
    assert {path.name for path in data_dir.glob("*.npz")} == set(REFERENCE)


def _figures(report: dict) -> tuple[float, ...]:
    return tuple(report[name] for name in FIGURES)


@pytest.mark.parametrize("name", REFERENCE_FILES)
def test_before_figures_reproduce_the_readme(name: str, reference_data) -> None:
    data = reference_data(name)
    _, error_percent, before, _ = REFERENCE[name]
    logits, labels = data["logits_test"], data["labels_test"]

    report = metrics.calibration_report(logits, labels, from_logits=True)

    assert_printed(_figures(report), before, ROUNDING)
    assert 100.0 * (1.0 - report["accuracy"]) == pytest.approx(error_percent, abs=1e-4)
    assert report["n"] == 5000
    # the single-figure functions, and the probabilities path, give the same numbers
    probabilities = softmax(logits)
    assert metrics.expected_calibration_error(probabilities, labels) == pytest.approx(
        report["ece"], abs=1e-15
    )
    assert metrics.maximum_calibration_error(probabilities, labels) == pytest.approx(report["mce"], abs=1e-15)
    assert metrics.negative_log_likelihood(probabilities, labels) == pytest.approx(report["nll"], rel=1e-12)
    assert metrics.brier_score(probabilities, labels) == pytest.approx(report["brier"], rel=1e-12)
    assert metrics.accuracy(logits, labels, from_logits=True) == report["accuracy"]


@pytest.mark.parametrize("name", REFERENCE_FILES)
def test_after_figures_with_the_readme_temperature(name: str, reference_data) -> None:
    data = reference_data(name)
    temperature, _, before, after = REFERENCE[name]
    logits, labels = data["logits_test"], data["labels_test"]

    report = metrics.calibration_report(logits.astype(np.float64) / temperature, labels, from_logits=True)

    assert_printed(_figures(report), after, WITH_ROUNDED_T)
    # temperature scaling keeps the argmax and, on these over-confident models, lowers every figure
    assert metrics.accuracy(logits, labels, from_logits=True) == report["accuracy"]
    assert all(a < b for a, b in zip(_figures(report), before, strict=True))


@pytest.mark.parametrize("name", REFERENCE_FILES)
def test_after_figures_with_the_fitted_temperature(name: str, reference_data) -> None:
    calibrators = pytest.importorskip("service.core.calibrators")
    data = reference_data(name)
    temperature, _, _, after = REFERENCE[name]

    fitted = calibrators.TemperatureScaling().fit(data["logits_val"], data["labels_val"]).temperature_
    report = metrics.calibration_report(
        data["logits_test"].astype(np.float64) / fitted, data["labels_test"], from_logits=True
    )

    assert fitted == pytest.approx(temperature, abs=1e-4)
    assert_printed(_figures(report), after, ROUNDING)
