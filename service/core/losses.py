"""Evaluation losses practitioners compare models with: focal, class-weighted cross-entropy, soft F1, AnyLoss
and the multiclass hinge.

Every loss is a pure function ``(logits, labels, *, sample_weight=None, ...) -> float``: the inputs are
checked with :mod:`service.core.validation` (finite 2-D logits, integer labels in range, non-negative
weights), a single logit column is a binary model expanded to ``[0, z]``
(:func:`service.core.probability.two_column_logits`), and all sums run in float64 whatever the input
dtype, so logits of ``+-1e4`` give finite values and no warnings.

``sample_weight`` multiplies each sample's contribution to every sum: a loss that is a mean becomes the
weighted mean ``sum_i s_i l_i / sum_i s_i``; a loss built on a (soft) confusion matrix weights every cell.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import expit

from service.core.probability import log_softmax, two_column_logits
from service.core.validation import (
    check_choice,
    check_labels,
    check_logits,
    check_sample_weight,
    n_label_classes,
)
from service.errors import InvalidInput

__all__ = [
    "ANYLOSS_METRICS",
    "DEFAULT_AMPLIFICATION",
    "EVALUATION_LOSS_CONVENTIONS",
    "SOFT_F1_AVERAGES",
    "anyloss",
    "anyloss_scores",
    "evaluation_losses",
    "focal_loss",
    "multiclass_hinge_loss",
    "soft_f1_loss",
    "weighted_cross_entropy",
]

SOFT_F1_AVERAGES = ("binary", "macro")
ANYLOSS_METRICS = ("f1", "accuracy", "balanced_accuracy")
DEFAULT_AMPLIFICATION = 73.0
"""The amplification ``L`` of AnyLoss' approximation function used by the authors' reference code."""

EVALUATION_LOSS_CONVENTIONS: dict[str, str] = {
    "focal": "mean of -(1 - p_y)^2 log p_y (gamma 2, no class weights; Lin et al. 2017)",
    "weighted_cross_entropy": (
        "sum_i w_i (-log p_{y_i}) / sum_i w_i with w_i = s_i * n / (n_present * count_{y_i}) "
        "('balanced' class weights; torch.nn.functional.cross_entropy(weight=) mean)"
    ),
    "soft_f1": "1 - soft F1 of softmax probabilities; class 1 for two classes, macro over classes otherwise",
    "anyloss_accuracy": "1 - soft accuracy from AnyLoss-amplified probabilities (L = 73; Han et al. 2024)",
    "anyloss_f1": "1 - soft F1 from AnyLoss-amplified probabilities; class 1 for two classes, else macro",
    "anyloss_balanced_accuracy": "1 - soft balanced accuracy (mean recall over classes present in labels)",
    "hinge": "Crammer-Singer mean of max(0, 1 - (z_y - max_{k != y} z_k)); sklearn.metrics.hinge_loss",
}
"""What each figure of :func:`evaluation_losses` means, for reports that must state their conventions."""


# ---------------------------------------------------------------------------------------------------------
# validation of options


def _validated(
    logits: Any, labels: Any, sample_weight: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    z = check_logits(logits)
    y = check_labels(labels, z.shape[0], z.shape[1])
    w = check_sample_weight(sample_weight, z.shape[0])
    return z, y, w


def _check_real(value: Any, name: str, *, minimum: float, strict: bool = False) -> float:
    """A finite real option ``>= minimum`` (``> minimum`` when ``strict``)."""
    if isinstance(value, bool):
        raise InvalidInput(f"{name} must be a number, got {value!r}", field=name)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be a number, got {value!r}", field=name) from None
    below = number <= minimum if strict else number < minimum
    if not np.isfinite(number) or below:
        relation = ">" if strict else ">="
        raise InvalidInput(f"{name} must be finite and {relation} {minimum:g}, got {value!r}", field=name)
    return number


def _class_weight_vector(
    class_weight: Any, labels: np.ndarray, n_classes: int, sample_weight: np.ndarray | None
) -> np.ndarray | None:
    """Resolve ``class_weight`` (None, ``"balanced"`` or one weight per class) to a float64 vector or None.

    ``"balanced"`` is ``sklearn.utils.class_weight.compute_class_weight("balanced", classes=present, y=labels,
    sample_weight=sample_weight)``: ``n / (n_present * count_k)`` over the classes present in ``labels``
    (counts weighted by ``sample_weight`` when given). A class absent from ``labels`` gets weight 0; no
    sample uses it. Written with bincount rather than calling scikit-learn: it sorts the labels first,
    which dominates at a million samples.
    """
    if class_weight is None:
        return None
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise InvalidInput(
                "class_weight must be None, 'balanced' or one non-negative weight per class; "
                f"got {class_weight!r}",
                field="class_weight",
            )
        counts = np.bincount(labels, weights=sample_weight, minlength=n_classes).astype(np.float64)
        present = counts > 0
        weights = np.zeros(n_classes, dtype=np.float64)
        with np.errstate(over="ignore"):
            weights[present] = counts.sum() / (np.count_nonzero(present) * counts[present])
        if not np.isfinite(weights).all():
            # a class whose weighted count is subnormal next to the total (weights of 5e-324 beside 1.0)
            k = int(np.flatnonzero(~np.isfinite(weights))[0])
            raise InvalidInput(
                f"class_weight='balanced' cannot balance class {k}: its weighted count {counts[k]:.3g} is too "
                f"small next to the total {counts.sum():.3g}; rescale sample_weight or give class_weight",
                field="class_weight",
            )
        return weights
    if hasattr(class_weight, "detach") and hasattr(class_weight, "cpu"):  # a torch tensor
        class_weight = class_weight.detach().cpu().numpy()
    try:
        weights = np.asarray(class_weight, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInput(
            "class_weight must be None, 'balanced' or one non-negative weight per class", field="class_weight"
        ) from None
    if weights.ndim != 1 or weights.shape[0] != n_classes:
        raise InvalidInput(
            f"class_weight has {weights.size} entries but there are {n_classes} classes",
            field="class_weight",
        )
    bad = ~np.isfinite(weights) | (weights < 0)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise InvalidInput(f"class_weight[{index}] must be finite and >= 0", field="class_weight")
    return weights


def _weighted_mean(values: np.ndarray, sample_weight: np.ndarray | None) -> float:
    if sample_weight is None:
        return float(np.mean(values, dtype=np.float64))
    return float(np.dot(sample_weight, values) / sample_weight.sum())


def _probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax as ``exp(log_softmax)`` in float64, so that every function here sees the same probabilities."""
    return np.exp(log_softmax(logits))


def _picked(matrix: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``matrix[i, labels[i]]`` for every row."""
    return np.take_along_axis(matrix, labels[:, None], axis=1)[:, 0]


# ---------------------------------------------------------------------------------------------------------
# focal loss and class-weighted cross-entropy


def _focal_from_log_probabilities(
    log_probabilities: np.ndarray,
    labels: np.ndarray,
    gamma: float,
    alpha: np.ndarray | None,
    sample_weight: np.ndarray | None,
) -> float:
    log_p_true = _picked(log_probabilities, labels)
    terms = -log_p_true
    if gamma != 0.0:
        # 1 - p_y as -expm1(log p_y): exact for confident rows where 1 - exp(...) would cancel to 0.
        terms = terms * np.clip(-np.expm1(log_p_true), 0.0, 1.0) ** gamma
    if alpha is not None:
        terms = terms * alpha[labels]
    return _weighted_mean(terms, sample_weight)


def focal_loss(
    logits: Any,
    labels: Any,
    *,
    gamma: float = 2.0,
    class_weight: Any = None,
    sample_weight: Any = None,
) -> float:
    r"""Focal loss of softmax probabilities (Lin et al. 2017).

    .. math::

        \mathrm{FL} = \frac{\sum_i s_i\, \alpha_{y_i} (1 - p_{i,y_i})^\gamma\, (-\log p_{i,y_i})}{\sum_i s_i}

    with :math:`\log p` the float64 log-softmax of the logits, :math:`\alpha` the class weights (1 when
    ``class_weight`` is None) and :math:`s` the sample weights (1 when None). This is the plain mean of the
    per-sample terms, as in torchvision's ``sigmoid_focal_loss(reduction="mean")``: the class weights scale
    the terms but do not normalise the mean (unlike :func:`weighted_cross_entropy`). With ``gamma=0`` and no
    class weights it is exactly the cross-entropy (mean negative log-likelihood).

    Parameters
    ----------
    logits : array-like of shape (n_samples, n_classes)
        Raw scores; a single column is the logit of class 1 of a binary model.
    labels : array-like of shape (n_samples,)
        Integer classes in ``[0, n_classes)`` (``{0, 1}`` for a single column).
    gamma : float, default=2.0
        Focusing parameter, finite and ``>= 0``.
    class_weight : None, "balanced" or array-like of shape (n_classes,), default=None
        :math:`\alpha`. ``"balanced"`` is ``n / (n_present * count_k)``, as
        ``sklearn.utils.class_weight.compute_class_weight``.
    sample_weight : array-like of shape (n_samples,), default=None
        Non-negative weight per sample.

    Returns
    -------
    float
        The focal loss, ``>= 0``.

    References
    ----------
    T.-Y. Lin, P. Goyal, R. Girshick, K. He, P. Dollár, "Focal Loss for Dense Object Detection", ICCV 2017.
    """
    z, y, w = _validated(logits, labels, sample_weight)
    gamma = _check_real(gamma, "gamma", minimum=0.0)
    alpha = _class_weight_vector(class_weight, y, n_label_classes(z.shape[1]), w)
    return _focal_from_log_probabilities(log_softmax(z), y, gamma, alpha, w)


def _weighted_ce_from_log_probabilities(
    log_probabilities: np.ndarray,
    labels: np.ndarray,
    class_weights: np.ndarray | None,
    sample_weight: np.ndarray | None,
) -> float:
    per_sample = -_picked(log_probabilities, labels)
    weights = np.ones_like(per_sample) if class_weights is None else class_weights[labels]
    if sample_weight is not None:
        weights = weights * sample_weight
    total = weights.sum()
    if total <= 0:
        raise InvalidInput(
            "class_weight (times sample_weight) gives every labelled sample weight 0", field="class_weight"
        )
    return float(np.dot(weights, per_sample) / total)


def weighted_cross_entropy(
    logits: Any, labels: Any, *, class_weight: Any = "balanced", sample_weight: Any = None
) -> float:
    r"""Class-weighted cross-entropy, with PyTorch's weighted-mean convention.

    .. math::

        \mathrm{WCE} = \frac{\sum_i w_i\, (-\log p_{i,y_i})}{\sum_i w_i}, \qquad w_i = s_i\, c_{y_i}

    with :math:`c` the class weights and :math:`s` the sample weights. The normalisation by
    :math:`\sum_i w_i` is that of ``torch.nn.functional.cross_entropy(logits, labels, weight=c)`` (mean
    reduction) and of ``sklearn.metrics.log_loss(labels, p, sample_weight=c[labels])``; so scaling all class
    weights by a constant does not change the value, and ``class_weight=None`` gives the plain cross-entropy.

    Parameters
    ----------
    logits : array-like of shape (n_samples, n_classes)
        Raw scores; a single column is the logit of class 1 of a binary model.
    labels : array-like of shape (n_samples,)
        Integer classes.
    class_weight : "balanced", None or array-like of shape (n_classes,), default="balanced"
        ``"balanced"``: :math:`c_k = n / (n_\mathrm{present} \cdot \mathrm{count}_k)` over the classes present
        in ``labels``, as ``sklearn.utils.class_weight.compute_class_weight("balanced", ...)`` (counts
        weighted by ``sample_weight`` when given, as scikit-learn does).
    sample_weight : array-like of shape (n_samples,), default=None
        Non-negative weight per sample.

    Returns
    -------
    float
        The weighted cross-entropy, ``>= 0``.

    References
    ----------
    G. King, L. Zeng, "Logistic Regression in Rare Events Data", Political Analysis 9(2), 2001 (the
    "balanced" heuristic); PyTorch ``torch.nn.CrossEntropyLoss`` documentation (weighted mean).
    """
    z, y, w = _validated(logits, labels, sample_weight)
    class_weights = _class_weight_vector(class_weight, y, n_label_classes(z.shape[1]), w)
    return _weighted_ce_from_log_probabilities(log_softmax(z), y, class_weights, w)


# ---------------------------------------------------------------------------------------------------------
# soft confusion-matrix figures: soft F1 and AnyLoss


def _soft_counts(
    scores: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class k: soft TP sum_i s_i q_ik [y_i=k], predicted mass sum_i s_i q_ik, count sum_i s_i [y_i=k]."""
    n_classes = scores.shape[1]
    on_true = _picked(scores, labels)
    if sample_weight is not None:
        on_true = on_true * sample_weight
        predicted = sample_weight @ scores
    else:
        predicted = scores.sum(axis=0, dtype=np.float64)
    true_positive = np.bincount(labels, weights=on_true, minlength=n_classes)
    actual = np.bincount(labels, weights=sample_weight, minlength=n_classes).astype(np.float64)
    return true_positive, predicted, actual


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, 0 where the denominator is 0 (scikit-learn's ``zero_division=0``)."""
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _soft_f1_per_class(
    scores: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray | None
) -> np.ndarray:
    true_positive, predicted, actual = _soft_counts(scores, labels, sample_weight)
    # 2TP / (2TP + FP + FN) = 2TP / (predicted + actual)
    return _safe_ratio(2.0 * true_positive, predicted + actual)


def _check_average(average: Any, n_classes: int) -> str:
    check_choice(average, "average", SOFT_F1_AVERAGES)
    if average == "binary" and n_classes != 2:
        raise InvalidInput(
            f"average='binary' needs 2 classes but the logits have {n_classes}; use average='macro'",
            field="average",
        )
    return average


def soft_f1_loss(logits: Any, labels: Any, *, average: str = "binary", sample_weight: Any = None) -> float:
    r"""One minus the soft F1 score of softmax probabilities.

    With :math:`p = \mathrm{softmax}(z)` and, per class :math:`k`, the soft counts

    .. math::

        \mathrm{TP}_k = \sum_i s_i\, p_{ik} [y_i = k], \quad
        \mathrm{FP}_k = \sum_i s_i\, p_{ik} [y_i \ne k], \quad
        \mathrm{FN}_k = \sum_i s_i\, (1 - p_{ik}) [y_i = k],

    :math:`F1_k = 2\mathrm{TP}_k / (2\mathrm{TP}_k + \mathrm{FP}_k + \mathrm{FN}_k)` (0 when the
    denominator is 0), and the loss is :math:`1 - F1_1` (``average="binary"``, class 1 is the positive
    class) or :math:`1 - \frac{1}{K}\sum_k F1_k` (``average="macro"``, over all ``K`` columns). On one-hot
    probabilities it equals ``1 - sklearn.metrics.f1_score(labels, argmax, labels=range(K), average=...,
    zero_division=0)``.

    Parameters
    ----------
    logits : array-like of shape (n_samples, n_classes)
        Raw scores; a single column is the logit of class 1 of a binary model.
    labels : array-like of shape (n_samples,)
        Integer classes.
    average : {"binary", "macro"}, default="binary"
        ``"binary"`` needs two classes (or one logit column).
    sample_weight : array-like of shape (n_samples,), default=None
        Non-negative weight per sample.

    Returns
    -------
    float
        The loss, in ``[0, 1]``.

    References
    ----------
    The soft F1 surrogate of, e.g., G. Bénédict, V. Koops, D. Odijk, M. de Rijke, "sigmoidF1: A Smooth F1
    Score Surrogate Loss for Multilabel Classification", TMLR 2022 (here on softmax probabilities).
    """
    z, y, w = _validated(logits, labels, sample_weight)
    probabilities = _probabilities(z)
    average = _check_average(average, probabilities.shape[1])
    return _soft_f1_loss_from_probabilities(probabilities, y, average, w)


def _soft_f1_loss_from_probabilities(
    probabilities: np.ndarray, labels: np.ndarray, average: str, sample_weight: np.ndarray | None
) -> float:
    f1 = _soft_f1_per_class(probabilities, labels, sample_weight)
    score = f1[1] if average == "binary" else f1.mean()
    return float(1.0 - score)


def _amplified(probabilities: np.ndarray, amplification: float) -> np.ndarray:
    """AnyLoss' approximation ``A(p) = 1 / (1 + exp(-L (p - 0.5)))`` of every class probability.

    With two classes, class 0 gets ``1 - A(p_1)`` (equal to ``A(p_0)`` in exact arithmetic) so that the
    soft confusion matrix is exactly the paper's, built from the amplified positive-class probability.
    """
    if probabilities.shape[1] == 2:
        positive = expit(amplification * (probabilities[:, 1] - 0.5))
        return np.stack([1.0 - positive, positive], axis=1)
    # In place: at a million rows the temporaries cost as much as expit itself.
    amplified = probabilities - 0.5
    amplified *= amplification
    return expit(amplified, out=amplified)


def _anyloss_scores_from_probabilities(
    probabilities: np.ndarray, labels: np.ndarray, amplification: float, sample_weight: np.ndarray | None
) -> dict[str, float]:
    amplified = _amplified(probabilities, amplification)
    true_positive, predicted, actual = _soft_counts(amplified, labels, sample_weight)
    f1 = _safe_ratio(2.0 * true_positive, predicted + actual)
    present = actual > 0
    return {
        # (TP + TN) / N in the binary case: the amplified probability of the true class, averaged.
        "accuracy": float(true_positive.sum() / actual.sum()),
        "f1": float(f1[1] if probabilities.shape[1] == 2 else f1.mean()),
        "balanced_accuracy": float(np.mean(true_positive[present] / actual[present])),
    }


def anyloss_scores(
    logits: Any, labels: Any, *, amplification: float = DEFAULT_AMPLIFICATION, sample_weight: Any = None
) -> dict[str, float]:
    r"""The soft accuracy, F1 and balanced accuracy that AnyLoss optimises (Han et al. 2024).

    Each softmax probability is amplified towards 0 or 1 by
    :math:`A(p) = 1 / (1 + e^{-L (p - 0.5)})` (``L = amplification``, 73 in the authors' code), and the
    amplified values :math:`\hat y` fill a soft confusion matrix. Binary (two columns, or one logit column),
    with :math:`\hat y_i = A(p_{i,1})`, :math:`n = \sum_i s_i`, :math:`n_1 = \sum_i s_i y_i`,
    :math:`n_0 = n - n_1`:

    .. math::

        \mathrm{TP} = \sum_i s_i y_i \hat y_i,\; \mathrm{FN} = n_1 - \mathrm{TP},\;
        \mathrm{FP} = \sum_i s_i \hat y_i - \mathrm{TP},\; \mathrm{TN} = n_0 - \mathrm{FP}

        \mathrm{accuracy} = \frac{\mathrm{TP} + \mathrm{TN}}{n},\quad
        F_1 = \frac{2\,\mathrm{TP}}{n_1 + \sum_i s_i \hat y_i},\quad
        \mathrm{balanced\ accuracy} = \frac{1}{2}\Big(\frac{\mathrm{TP}}{n_1} + \frac{\mathrm{TN}}{n_0}\Big).

    These are the formulas of the authors' reference implementation (github.com/doheonhan/anyloss,
    ``Ours_Accu``, ``Ours_Fbeta`` with beta 1, ``Ours_BAccu``), without its smoothing constant; a zero
    denominator gives 0, and balanced accuracy averages the recall of the classes present in ``labels``
    only, as ``sklearn.metrics.balanced_accuracy_score`` does.

    For ``K > 2`` classes (the paper is binary) each class is one-vs-rest with
    :math:`\hat y_{ik} = A(p_{ik})`: F1 is the macro average of the per-class F1 over all ``K`` classes,
    balanced accuracy the mean per-class recall :math:`\sum_i s_i [y_i=k] \hat y_{ik} / n_k` over classes
    present, and accuracy the weighted mean of :math:`\hat y_{i,y_i}` (the binary formula above, written per
    sample; it equals accuracy on hard predictions, which a macro one-vs-rest accuracy would not). As
    probabilities become one-hot each figure tends to its scikit-learn counterpart on ``argmax`` predictions.

    Parameters
    ----------
    logits : array-like of shape (n_samples, n_classes)
        Raw scores; a single column is the logit of class 1 of a binary model.
    labels : array-like of shape (n_samples,)
        Integer classes.
    amplification : float, default=73.0
        ``L``, finite and ``> 0``.
    sample_weight : array-like of shape (n_samples,), default=None
        Non-negative weight per sample.

    Returns
    -------
    dict
        ``{"accuracy": float, "f1": float, "balanced_accuracy": float}``, each in ``[0, 1]``.

    References
    ----------
    D. Han, N. Moniz, N. V. Chawla, "AnyLoss: Transforming Classification Metrics into Loss Functions",
    KDD 2024, arXiv:2405.14745.
    """
    z, y, w = _validated(logits, labels, sample_weight)
    amplification = _check_real(amplification, "amplification", minimum=0.0, strict=True)
    return _anyloss_scores_from_probabilities(_probabilities(z), y, amplification, w)


def anyloss(
    logits: Any,
    labels: Any,
    *,
    amplification: float = DEFAULT_AMPLIFICATION,
    metric: str = "f1",
    sample_weight: Any = None,
) -> float:
    r"""AnyLoss: one minus a soft confusion-matrix metric of amplified probabilities (Han et al. 2024).

    :math:`\mathrm{loss} = 1 - M(\mathrm{TN}, \mathrm{FN}, \mathrm{FP}, \mathrm{TP})` with the soft confusion
    matrix and the metrics :math:`M` defined in :func:`anyloss_scores`.

    Parameters
    ----------
    logits : array-like of shape (n_samples, n_classes)
        Raw scores; a single column is the logit of class 1 of a binary model.
    labels : array-like of shape (n_samples,)
        Integer classes.
    amplification : float, default=73.0
        ``L`` of the approximation function, finite and ``> 0``.
    metric : {"f1", "accuracy", "balanced_accuracy"}, default="f1"
        The metric to turn into a loss (F1 of class 1 for two classes, macro F1 otherwise).
    sample_weight : array-like of shape (n_samples,), default=None
        Non-negative weight per sample.

    Returns
    -------
    float
        The loss, in ``[0, 1]``.

    References
    ----------
    D. Han, N. Moniz, N. V. Chawla, "AnyLoss: Transforming Classification Metrics into Loss Functions",
    KDD 2024, arXiv:2405.14745.
    """
    check_choice(metric, "metric", ANYLOSS_METRICS)
    scores = anyloss_scores(logits, labels, amplification=amplification, sample_weight=sample_weight)
    return float(1.0 - scores[metric])


# ---------------------------------------------------------------------------------------------------------
# multiclass hinge


def _hinge_from_logits(
    logits: np.ndarray, labels: np.ndarray, margin: float, sample_weight: np.ndarray | None
) -> float:
    z = two_column_logits(np.asarray(logits, dtype=np.float64))
    true_score = _picked(z, labels)
    others = z.copy()
    others[np.arange(z.shape[0]), labels] = -np.inf
    losses = np.maximum(margin - (true_score - others.max(axis=1)), 0.0)
    return _weighted_mean(losses, sample_weight)


def multiclass_hinge_loss(
    logits: Any, labels: Any, *, margin: float = 1.0, sample_weight: Any = None
) -> float:
    r"""Crammer-Singer multiclass hinge loss of the raw scores.

    .. math::

        \mathrm{hinge} = \frac{\sum_i s_i \max\big(0,\; m - (z_{i,y_i} - \max_{k \ne y_i} z_{ik})\big)}
                              {\sum_i s_i}

    With ``margin=1`` this is ``sklearn.metrics.hinge_loss(labels, logits, labels=range(K),
    sample_weight=...)`` for ``K > 2``; for two columns it equals scikit-learn's binary hinge loss on the
    decision ``z_1 - z_0``, and for a single logit column (expanded to ``[0, z]``) on ``z`` itself, with
    labels 0/1 read as -1/+1.

    Parameters
    ----------
    logits : array-like of shape (n_samples, n_classes)
        Raw decision scores; a single column is the score of class 1 of a binary model.
    labels : array-like of shape (n_samples,)
        Integer classes.
    margin : float, default=1.0
        Required gap between the true class' score and the best other one, finite and ``>= 0``.
    sample_weight : array-like of shape (n_samples,), default=None
        Non-negative weight per sample.

    Returns
    -------
    float
        The mean hinge loss, ``>= 0``.

    References
    ----------
    K. Crammer, Y. Singer, "On the Algorithmic Implementation of Multiclass Kernel-based Vector Machines",
    JMLR 2, 2001.
    """
    z, y, w = _validated(logits, labels, sample_weight)
    margin = _check_real(margin, "margin", minimum=0.0)
    return _hinge_from_logits(z, y, margin, w)


# ---------------------------------------------------------------------------------------------------------
# all losses at once (the /v1/metrics route)


def evaluation_losses(logits: Any, labels: Any, *, sample_weight: Any = None) -> dict[str, float]:
    """Every scalar loss of this module with its default options, from one validation and one softmax.

    Returns
    -------
    dict
        ``focal`` (gamma 2), ``weighted_cross_entropy`` ("balanced"), ``soft_f1`` (binary for two classes,
        macro otherwise), ``anyloss_accuracy``, ``anyloss_f1``, ``anyloss_balanced_accuracy`` (L = 73) and
        ``hinge`` (margin 1); :data:`EVALUATION_LOSS_CONVENTIONS` states each one's convention. Each value
        equals the corresponding function called alone.
    """
    z, y, w = _validated(logits, labels, sample_weight)
    log_probabilities = log_softmax(z)
    probabilities = np.exp(log_probabilities)
    n_classes = probabilities.shape[1]
    balanced = _class_weight_vector("balanced", y, n_classes, w)
    anyloss_figures = _anyloss_scores_from_probabilities(probabilities, y, DEFAULT_AMPLIFICATION, w)
    return {
        "focal": _focal_from_log_probabilities(log_probabilities, y, 2.0, None, w),
        "weighted_cross_entropy": _weighted_ce_from_log_probabilities(log_probabilities, y, balanced, w),
        "soft_f1": _soft_f1_loss_from_probabilities(
            probabilities, y, "binary" if n_classes == 2 else "macro", w
        ),
        "anyloss_accuracy": 1.0 - anyloss_figures["accuracy"],
        "anyloss_f1": 1.0 - anyloss_figures["f1"],
        "anyloss_balanced_accuracy": 1.0 - anyloss_figures["balanced_accuracy"],
        "hinge": _hinge_from_logits(z, y, 1.0, w),
    }
