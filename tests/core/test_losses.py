"""Evaluation losses against scikit-learn, PyTorch and formulas written here independently.

The references are computed by another route than service/core/losses.py (torch ops, sklearn metrics, the
AnyLoss authors' closed forms), so a shared mistake would have to be made twice to pass unnoticed.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    hinge_loss,
    log_loss,
)
from sklearn.utils.class_weight import compute_class_weight

from service.core.losses import (
    anyloss,
    anyloss_scores,
    evaluation_losses,
    focal_loss,
    multiclass_hinge_loss,
    soft_f1_loss,
    weighted_cross_entropy,
)
from service.errors import InvalidInput


def _problem(n: int, k: int, *, seed: int, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits with signal (the true class gets a bump) so metrics are neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, max(k, 2), size=n)
    logits = rng.normal(scale=scale, size=(n, k))
    if k > 1:
        logits[np.arange(n), labels] += 1.5
    else:
        logits[:, 0] += 1.5 * (2 * labels - 1)
    return logits, labels


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


def _confident(labels_or_predictions: np.ndarray, k: int, value: float = 50.0) -> np.ndarray:
    """Logits +value on the given class, -value elsewhere: softmax is one-hot to float64 rounding."""
    return np.where(np.eye(k, dtype=bool)[labels_or_predictions], value, -value)


# ---------------------------------------------------------------------------------------------------------
# focal loss


@pytest.mark.parametrize("k", [5, 2])
def test_focal_gamma_zero_is_cross_entropy(k: int) -> None:
    logits, labels = _problem(400, k, seed=1)
    expected_torch = F.cross_entropy(torch.as_tensor(logits), torch.as_tensor(labels)).item()
    expected_sklearn = log_loss(labels, _softmax(logits), labels=range(k))
    value = focal_loss(logits, labels, gamma=0.0)
    assert value == pytest.approx(expected_torch, rel=1e-12)
    assert value == pytest.approx(expected_sklearn, rel=1e-10)


def test_focal_gamma_zero_single_column_is_binary_cross_entropy() -> None:
    logits, labels = _problem(300, 1, seed=2)
    expected = F.binary_cross_entropy_with_logits(
        torch.as_tensor(logits[:, 0]), torch.as_tensor(labels, dtype=torch.float64)
    ).item()
    assert focal_loss(logits, labels, gamma=0.0) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_focal_matches_an_explicit_torch_computation(gamma: float) -> None:
    logits, labels = _problem(500, 6, seed=3)
    alpha = np.array([0.5, 1.0, 2.0, 0.25, 1.5, 3.0])
    sample_weight = np.random.default_rng(4).uniform(0.1, 2.0, size=500)
    z, y = torch.as_tensor(logits), torch.as_tensor(labels)
    p_true = torch.softmax(z, dim=1)[torch.arange(500), y]
    terms = -torch.as_tensor(alpha)[y] * (1 - p_true) ** gamma * torch.log(p_true)
    sw = torch.as_tensor(sample_weight)
    expected = ((sw * terms).sum() / sw.sum()).item()
    value = focal_loss(logits, labels, gamma=gamma, class_weight=alpha, sample_weight=sample_weight)
    assert value == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_focal_single_column_matches_torchvision_sigmoid_focal_formula(alpha: float | None) -> None:
    # torchvision.ops.sigmoid_focal_loss, restated (torchvision is not a dependency).
    logits, labels = _problem(300, 1, seed=5)
    x = torch.as_tensor(logits[:, 0])
    t = torch.as_tensor(labels, dtype=torch.float64)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** 2.0
    class_weight = None
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
        class_weight = [1 - alpha, alpha]
    assert focal_loss(logits, labels, gamma=2.0, class_weight=class_weight) == pytest.approx(
        loss.mean().item(), rel=1e-10
    )


def test_focal_balanced_class_weight_is_sklearns() -> None:
    logits, labels = _problem(300, 4, seed=6)
    labels[labels == 3] = 0  # a class absent from the labels: it gets no weight and no sample uses it
    present = np.unique(labels)
    weights = np.zeros(4)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    assert focal_loss(logits, labels, class_weight="balanced") == pytest.approx(
        focal_loss(logits, labels, class_weight=weights), rel=1e-12
    )


def test_focal_is_below_cross_entropy_and_decreases_with_gamma() -> None:
    logits, labels = _problem(300, 3, seed=7)
    values = [focal_loss(logits, labels, gamma=g) for g in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in itertools.pairwise(values))


# ---------------------------------------------------------------------------------------------------------
# class-weighted cross-entropy


@pytest.mark.parametrize("k", [4, 2])
def test_weighted_cross_entropy_matches_torch_and_sklearn(k: int) -> None:
    logits, labels = _problem(600, k, seed=8)
    class_weight = np.linspace(0.5, 3.0, k)
    expected_torch = F.cross_entropy(
        torch.as_tensor(logits), torch.as_tensor(labels), weight=torch.as_tensor(class_weight)
    ).item()
    expected_sklearn = log_loss(labels, _softmax(logits), sample_weight=class_weight[labels], labels=range(k))
    value = weighted_cross_entropy(logits, labels, class_weight=class_weight)
    assert value == pytest.approx(expected_torch, rel=1e-12)
    assert value == pytest.approx(expected_sklearn, rel=1e-10)


def test_weighted_cross_entropy_balanced_uses_sklearns_weights_with_sample_weight() -> None:
    logits, labels = _problem(500, 3, seed=9)
    labels[:400] = 0  # imbalanced
    sample_weight = np.random.default_rng(10).uniform(0.2, 3.0, size=500)
    weights = compute_class_weight("balanced", classes=np.arange(3), y=labels, sample_weight=sample_weight)
    expected = F.cross_entropy(
        torch.as_tensor(logits), torch.as_tensor(labels), weight=torch.as_tensor(weights), reduction="none"
    )
    per_sample_weight = torch.as_tensor(weights[labels] * sample_weight)
    expected_value = ((expected / torch.as_tensor(weights[labels])) * per_sample_weight).sum() / (
        per_sample_weight.sum()
    )
    value = weighted_cross_entropy(logits, labels, class_weight="balanced", sample_weight=sample_weight)
    assert value == pytest.approx(expected_value.item(), rel=1e-12)
    unbalanced = weighted_cross_entropy(logits, labels, class_weight=None, sample_weight=sample_weight)
    assert value != pytest.approx(unbalanced, rel=1e-3)


def test_weighted_cross_entropy_is_scale_free_and_none_is_plain_cross_entropy() -> None:
    logits, labels = _problem(200, 3, seed=11)
    weights = np.array([1.0, 2.0, 5.0])
    assert weighted_cross_entropy(logits, labels, class_weight=weights) == pytest.approx(
        weighted_cross_entropy(logits, labels, class_weight=7.5 * weights), rel=1e-12
    )
    assert weighted_cross_entropy(logits, labels, class_weight=None) == pytest.approx(
        log_loss(labels, _softmax(logits), labels=range(3)), rel=1e-10
    )


# ---------------------------------------------------------------------------------------------------------
# hinge


def test_hinge_matches_sklearn_multiclass() -> None:
    logits, labels = _problem(500, 5, seed=12)
    sample_weight = np.random.default_rng(13).uniform(0.0, 2.0, size=500)
    assert multiclass_hinge_loss(logits, labels) == pytest.approx(
        hinge_loss(labels, logits, labels=range(5)), rel=1e-12
    )
    assert multiclass_hinge_loss(logits, labels, sample_weight=sample_weight) == pytest.approx(
        hinge_loss(labels, logits, labels=range(5), sample_weight=sample_weight), rel=1e-12
    )


def test_hinge_binary_matches_sklearn_on_the_decision() -> None:
    two, labels = _problem(400, 2, seed=14)
    assert multiclass_hinge_loss(two, labels) == pytest.approx(
        hinge_loss(labels, two[:, 1] - two[:, 0]), rel=1e-12
    )
    one, labels = _problem(400, 1, seed=15)
    assert multiclass_hinge_loss(one, labels) == pytest.approx(hinge_loss(labels, one[:, 0]), rel=1e-12)


def test_hinge_margin_scales_with_the_logits() -> None:
    # max(0, m - d) = m * max(0, 1 - d / m)
    logits, labels = _problem(300, 4, seed=16)
    assert multiclass_hinge_loss(logits, labels, margin=3.0) == pytest.approx(
        3.0 * multiclass_hinge_loss(logits / 3.0, labels), rel=1e-12
    )
    assert multiclass_hinge_loss(_confident(labels, 4, 5.0), labels, margin=0.0) == 0.0


# ---------------------------------------------------------------------------------------------------------
# classification report


# ---------------------------------------------------------------------------------------------------------
# soft F1 and AnyLoss


@pytest.mark.parametrize(("k", "average"), [(2, "binary"), (2, "macro"), (5, "macro")])
def test_soft_f1_on_confident_logits_is_one_minus_sklearn_f1(k: int, average: str) -> None:
    _, labels = _problem(300, k, seed=19)
    rng = np.random.default_rng(20)
    predicted = np.where(rng.random(300) < 0.7, labels, rng.integers(0, k, 300))
    sample_weight = rng.uniform(0.1, 2.0, size=300)
    logits = _confident(predicted, k)
    expected = f1_score(labels, predicted, average=average, labels=range(k), zero_division=0)
    assert soft_f1_loss(logits, labels, average=average) == pytest.approx(1.0 - expected, abs=1e-12)
    weighted = f1_score(
        labels, predicted, average=average, labels=range(k), zero_division=0, sample_weight=sample_weight
    )
    assert soft_f1_loss(logits, labels, average=average, sample_weight=sample_weight) == pytest.approx(
        1.0 - weighted, abs=1e-12
    )


def test_soft_f1_uses_probabilities_not_predictions() -> None:
    logits, labels = _problem(300, 2, seed=21)
    p = _softmax(logits)[:, 1]
    expected = 1.0 - 2 * np.sum(p * labels) / (np.sum(p) + np.sum(labels))
    assert soft_f1_loss(logits, labels) == pytest.approx(expected, rel=1e-12)
    hard = 1.0 - f1_score(labels, p > 0.5)
    assert soft_f1_loss(logits, labels) > hard  # soft counts are less sure than the argmax


@pytest.mark.parametrize("k", [2, 4])
def test_anyloss_on_confident_logits_approaches_the_hard_metrics(k: int) -> None:
    _, labels = _problem(400, k, seed=22)
    rng = np.random.default_rng(23)
    predicted = np.where(rng.random(400) < 0.6, labels, rng.integers(0, k, 400))
    logits = _confident(predicted, k)
    average = "binary" if k == 2 else "macro"
    hard = {
        "accuracy": accuracy_score(labels, predicted),
        "f1": f1_score(labels, predicted, average=average, labels=range(k), zero_division=0),
        "balanced_accuracy": balanced_accuracy_score(labels, predicted),
    }
    scores = anyloss_scores(logits, labels)
    for metric, value in hard.items():
        assert scores[metric] == pytest.approx(value, abs=1e-12)
        assert anyloss(logits, labels, metric=metric) == pytest.approx(1.0 - value, abs=1e-12)


def test_anyloss_balanced_accuracy_averages_recall_over_classes_present() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2])  # class 3 never occurs but is predicted once
    predicted = np.array([0, 3, 1, 1, 0, 2, 2, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sklearn: y_pred contains classes not in y_true
        expected = balanced_accuracy_score(labels, predicted)
    assert expected == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)
    assert anyloss_scores(_confident(predicted, 4), labels)["balanced_accuracy"] == pytest.approx(
        expected, abs=1e-12
    )


def test_anyloss_binary_matches_the_authors_closed_forms() -> None:
    # github.com/doheonhan/anyloss: Ours_Accu, Ours_Fbeta (beta 1), Ours_BAccu, without smoothing constant.
    logits, labels = _problem(500, 1, seed=24, scale=0.5)
    big_l = 73.0
    p = torch.sigmoid(torch.as_tensor(logits[:, 0]))
    y_hat = 1.0 / (1.0 + torch.exp(-big_l * (p - 0.5)))
    y = torch.as_tensor(labels, dtype=torch.float64)
    n, s_y, s_yhat, s_yyhat = len(labels), y.sum(), y_hat.sum(), (y * y_hat).sum()
    accuracy = (n - s_y - s_yhat + 2 * s_yyhat) / n
    f1 = 2 * s_yyhat / (s_y + s_yhat)
    balanced = (n * (s_yyhat + s_y) - s_y * (s_yhat + s_y)) / (2 * s_y * (n - s_y))
    scores = anyloss_scores(logits, labels, amplification=big_l)
    assert scores["accuracy"] == pytest.approx(accuracy.item(), rel=1e-12)
    assert scores["f1"] == pytest.approx(f1.item(), rel=1e-12)
    assert scores["balanced_accuracy"] == pytest.approx(balanced.item(), rel=1e-12)
    # two columns [0, z] are the same binary model
    two = np.concatenate([np.zeros_like(logits), logits], axis=1)
    assert anyloss_scores(two, labels) == pytest.approx(scores, rel=1e-12)


def test_anyloss_large_amplification_thresholds_probabilities_at_one_half() -> None:
    # A(p) tends to 1[p > 0.5]: the binary figures tend to the hard ones; with K > 2 the true class counts as
    # found only where p_y > 0.5, which is stricter than argmax.
    binary_logits, binary_labels = _problem(500, 2, seed=25, scale=1.0)
    predicted = binary_logits.argmax(axis=1)
    assert anyloss_scores(binary_logits, binary_labels, amplification=1e6) == pytest.approx(
        {
            "accuracy": accuracy_score(binary_labels, predicted),
            "f1": f1_score(binary_labels, predicted),
            "balanced_accuracy": balanced_accuracy_score(binary_labels, predicted),
        },
        abs=1e-3,
    )
    logits, labels = _problem(500, 3, seed=25, scale=1.0)
    p_true = _softmax(logits)[np.arange(500), labels]
    assert anyloss_scores(logits, labels, amplification=1e6)["accuracy"] == pytest.approx(
        np.mean(p_true > 0.5), abs=1e-3
    )
    assert np.mean(p_true > 0.5) < accuracy_score(labels, logits.argmax(axis=1))
    assert abs(anyloss_scores(logits, labels, amplification=2.0)["accuracy"] - np.mean(p_true > 0.5)) > 0.05


# ---------------------------------------------------------------------------------------------------------
# torch twins


# ---------------------------------------------------------------------------------------------------------
# properties


@st.composite
def _labelled_logits(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 30))
    k = draw(st.integers(1, 6))
    elements = st.one_of(
        st.floats(-30, 30, allow_nan=False, width=64), st.sampled_from([-1e4, 1e4, 0.0, 1e-300])
    )
    logits = draw(hnp.arrays(np.float64, (n, k), elements=elements))
    labels = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, max(k, 2) - 1)))
    return logits, labels


def _all_losses(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    figures = evaluation_losses(logits, labels)
    figures["focal_balanced"] = focal_loss(logits, labels, gamma=1.5, class_weight="balanced")
    figures["soft_f1_macro"] = soft_f1_loss(logits, labels, average="macro")
    return figures


@settings(max_examples=60, deadline=None)
@given(_labelled_logits())
def test_losses_are_finite_and_non_negative(case: tuple[np.ndarray, np.ndarray]) -> None:
    logits, labels = case
    with warnings.catch_warnings(), np.errstate(divide="raise", over="raise", invalid="raise"):
        warnings.simplefilter("error")
        figures = _all_losses(logits, labels)
    for name, value in figures.items():
        assert np.isfinite(value) and value >= 0.0, name
        if "f1" in name or "anyloss" in name:
            assert value <= 1.0 + 1e-12, name


@settings(max_examples=40, deadline=None)
@given(_labelled_logits(), st.randoms(use_true_random=False))
def test_losses_are_invariant_to_sample_order(case: tuple[np.ndarray, np.ndarray], random) -> None:
    logits, labels = case
    order = list(range(len(labels)))
    random.shuffle(order)
    assert _all_losses(logits[order], labels[order]) == pytest.approx(
        _all_losses(logits, labels), rel=1e-9, abs=1e-12
    )


@settings(max_examples=40, deadline=None)
@given(_labelled_logits(), st.randoms(use_true_random=False))
def test_class_symmetric_losses_are_invariant_to_class_relabelling(
    case: tuple[np.ndarray, np.ndarray], random
) -> None:
    logits, labels = case
    if logits.shape[1] == 1:
        logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
    k = logits.shape[1]
    permutation = list(range(k))
    random.shuffle(permutation)
    new_labels = np.argsort(permutation)[labels]  # column permutation[j] becomes column j
    permuted = logits[:, permutation]

    def symmetric(z: np.ndarray, y: np.ndarray) -> list[float]:
        return [
            focal_loss(z, y),
            weighted_cross_entropy(z, y),
            multiclass_hinge_loss(z, y),
            soft_f1_loss(z, y, average="macro"),
            anyloss(z, y, metric="balanced_accuracy"),
        ]

    assert symmetric(permuted, new_labels) == pytest.approx(symmetric(logits, labels), rel=1e-9, abs=1e-12)


def test_evaluation_losses_equal_the_functions_called_alone() -> None:
    for k in (1, 2, 5):
        logits, labels = _problem(200, k, seed=28)
        sample_weight = np.random.default_rng(29).uniform(0.0, 1.0, size=200)
        figures = evaluation_losses(logits, labels, sample_weight=sample_weight)
        kw = {"sample_weight": sample_weight}
        assert figures == {
            "focal": focal_loss(logits, labels, **kw),
            "weighted_cross_entropy": weighted_cross_entropy(logits, labels, **kw),
            "soft_f1": soft_f1_loss(logits, labels, average="macro" if k > 2 else "binary", **kw),
            "anyloss_accuracy": anyloss(logits, labels, metric="accuracy", **kw),
            "anyloss_f1": anyloss(logits, labels, metric="f1", **kw),
            "anyloss_balanced_accuracy": anyloss(logits, labels, metric="balanced_accuracy", **kw),
            "hinge": multiclass_hinge_loss(logits, labels, **kw),
        }


def test_extreme_logits_give_finite_values_without_warnings() -> None:
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4], [0.0, 0.0, 1e4]], dtype=np.float32)
    labels = np.array([1, 1, 2])
    with warnings.catch_warnings(), np.errstate(divide="raise", over="raise", invalid="raise"):
        warnings.simplefilter("error")
        figures = evaluation_losses(logits, labels)
        binary = evaluation_losses(np.array([[1e4], [-1e4]]), [0, 0])
    assert figures["focal"] == pytest.approx(2e4 / 3)  # one row wrong by 2e4 nats, (1 - 0)^2 = 1
    assert figures["hinge"] == pytest.approx((1 + 2e4) / 3)
    assert figures["anyloss_accuracy"] == pytest.approx(1 / 3)
    assert binary["focal"] == pytest.approx(5e3) and binary["soft_f1"] == 1.0
    assert all(np.isfinite(list(binary.values())))


# ---------------------------------------------------------------------------------------------------------
# bad input


def test_bad_options_are_rejected_with_clear_messages() -> None:
    logits, labels = _problem(20, 4, seed=30)
    with pytest.raises(InvalidInput, match=r"average must be one of binary, macro; got 'micro'"):
        soft_f1_loss(logits, labels, average="micro")
    with pytest.raises(
        InvalidInput, match=r"average='binary' needs 2 classes .* have 4; use average='macro'"
    ):
        soft_f1_loss(logits, labels)
    with pytest.raises(
        InvalidInput, match=r"metric must be one of f1, accuracy, balanced_accuracy; got 'auc'"
    ):
        anyloss(logits, labels, metric="auc")
    with pytest.raises(InvalidInput, match=r"class_weight has 3 entries but there are 4 classes"):
        weighted_cross_entropy(logits, labels, class_weight=[1.0, 2.0, 3.0])
    with pytest.raises(InvalidInput, match=r"class_weight has 4 entries but there are 2 classes"):
        focal_loss(logits[:, :1], labels % 2, class_weight=[1.0, 1.0, 1.0, 1.0])
    with pytest.raises(InvalidInput, match=r"class_weight\[1\] must be finite and >= 0"):
        focal_loss(logits, labels, class_weight=[1.0, -1.0, 1.0, 1.0])
    with pytest.raises(InvalidInput, match=r"class_weight must be None, 'balanced' or .*'inverse'"):
        weighted_cross_entropy(logits, labels, class_weight="inverse")
    with pytest.raises(InvalidInput, match=r"every labelled sample weight 0"):
        weighted_cross_entropy(logits, np.zeros(20, dtype=int), class_weight=[0.0, 1.0, 1.0, 1.0])
    with pytest.raises(InvalidInput, match=r"gamma must be finite and >= 0, got -1"):
        focal_loss(logits, labels, gamma=-1)
    with pytest.raises(InvalidInput, match=r"amplification must be finite and > 0, got 0"):
        anyloss_scores(logits, labels, amplification=0)
    with pytest.raises(InvalidInput, match=r"margin must be a number, got 'wide'"):
        multiclass_hinge_loss(logits, labels, margin="wide")


def test_bad_data_is_rejected_with_the_row() -> None:
    logits, labels = _problem(20, 3, seed=31)
    logits[7, 1] = np.nan
    for loss in (focal_loss, weighted_cross_entropy, multiclass_hinge_loss, anyloss, evaluation_losses):
        with pytest.raises(InvalidInput, match=r"logits contains NaN or Inf at row 7") as caught:
            loss(logits, labels)
        assert caught.value.row == 7
    with pytest.raises(InvalidInput, match=r"labels\[2\] = 3 is outside \[0, 3\)"):
        soft_f1_loss(np.zeros((4, 3)), [0, 1, 3, 2], average="macro")
    with pytest.raises(InvalidInput, match=r"sample_weight\[1\] must be finite and >= 0"):
        focal_loss(np.zeros((3, 2)), [0, 1, 0], sample_weight=[1.0, -2.0, 1.0])
