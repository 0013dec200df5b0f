"""Inductive Venn–Abers prediction (Vovk & Petej 2014), by the fast algorithm of Vovk, Petej & Fedorova (2015).

The fit precomputes, for every position a test score can take among the calibration scores, the two
isotonic-regression values ``p0`` and ``p1`` (the test object added with label 0, or with label 1), so that
``transform`` is two binary searches per row and class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from service.core import cancellation
from service.core.calibrators.base import BaseCalibrator, _doc_array
from service.core.calibrators.binning import OneVsRestCurves
from service.core.validation import check_positive_int
from service.errors import InvalidInput

if TYPE_CHECKING:  # torch is imported only where a module is built
    import torch

VENN_ABERS_MAX_GRID = 1_000_000
"""Most grid points (distinct calibration scores where ``p0`` or ``p1`` changes) over all curves of a
fitted Venn–Abers calibrator: three numbers each in the document, about 60 bytes of JSON, so the document
stays under the 64 MiB upload limit. Rounding the scores (``precision``) merges points."""
VENN_ABERS_MAX_PRECISION = 15
"""Most decimals of ``precision`` (float64 holds about 15 significant digits)."""


def rival_margins(z: np.ndarray) -> np.ndarray:
    """Each class's one-vs-rest score ``s_k = z_k - max_{j != k} z_j``, float64 ``(n, K)``.

    The log-odds of class ``k`` against its strongest rival: positive for the top class only, and for a
    binary model ``z1 - z0`` (class 1) and ``z0 - z1`` (class 0). A maximum and one subtraction, so the
    TorchScript twin computes the same float64 bits and finds the same grid interval for every row.
    """
    z = z.astype(np.float64, copy=False)
    top_two = np.partition(z, z.shape[1] - 2, axis=1)[:, -2:]
    second, first = top_two[:, :1], top_two[:, 1:]
    return z - np.where(z == first, second, first)


def _upper_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``p1`` of every test position: the isotonic fit at a test object of label 1 (weight 1).

    ``(x, y)`` is the cumulative sum diagram of the calibration groups, ``x[0] = y[0] = 0`` and ``x[i]``,
    ``y[i]`` the weight and label sum of the ``i`` lowest distinct scores. A test object placed after
    group ``i`` (position ``i`` of ``0..k``) adds the step ``(1, 1)`` there; shifting the diagram's points up
    to ``i`` by ``(-1, -1)`` instead leaves the others in place, and the isotonic value is the slope of the
    greatest convex minorant (the lower hull) over ``[x_i - 1, x_i]``. Moving the test object one group to
    the right adds one shifted point ``P_{i+1} - (1, 1)`` to the point set; the unshifted ``P_i`` may stay,
    since it is ``(1, 1)`` above a point of the set and every hull slope is at most 1, so it is never below
    the hull. So the hull only ever gains points: it is kept as a stack from the vertex at or left of the
    test's step rightwards (vertices further left can never again be the step's left end), each point is
    pushed and popped at most once, and the whole sweep is linear (Vovk, Petej & Fedorova 2015,
    algorithms 1-2). Written as a Python loop: a hull is sequential, and numpy has no primitive for it.
    """
    xs, ys = [-1.0, *x.tolist()], [-1.0, *y.tolist()]
    n_points = len(xs)
    hull: list[int] = []  # the lower hull of all points, left to right
    for j in range(n_points):
        xj, yj = xs[j], ys[j]
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is dropped unless the turn a -> b -> j is strictly convex
            if (xs[b] - xs[a]) * (yj - ys[a]) - (ys[b] - ys[a]) * (xj - xs[a]) > 0:
                break
            hull.pop()
        hull.append(j)
    # as a stack with the leftmost vertex on top; new shifted points are appended to xs, ys
    stack = hull[::-1]
    pop, push = stack.pop, stack.append
    a, b = stack[-1], stack[-2]
    p1 = [(ys[b] - ys[a]) / (xs[b] - xs[a])]
    for i in range(2, n_points):  # the test object after group i - 1: its step starts at the shifted P_{i-1}
        qx, qy = xs[i] - 1.0, ys[i] - 1.0
        while len(stack) >= 2 and xs[stack[-2]] <= qx:
            pop()
        a, b = stack[-1], stack[-2]
        # strictly below the hull segment a -> b (a at or left of q, b right of it): q is a vertex
        if (xs[b] - xs[a]) * (qy - ys[a]) - (ys[b] - ys[a]) * (qx - xs[a]) < 0:
            pop()
            while len(stack) >= 2:
                b, c = stack[-1], stack[-2]
                if (xs[b] - qx) * (ys[c] - qy) - (ys[b] - qy) * (xs[c] - qx) > 0:
                    break
                pop()
            xs.append(qx)
            ys.append(qy)
            push(len(xs) - 1)
        a, b = stack[-1], stack[-2]
        p1.append((ys[b] - ys[a]) / (xs[b] - xs[a]))
    return np.array(p1)


def venn_abers_curve(
    scores: np.ndarray, targets: np.ndarray, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fitted IVAP of one binary problem: ``(grid, p0, p1)``.

    ``grid`` holds the distinct calibration scores where ``p0`` or ``p1`` changes, increasing; ``p0`` and
    ``p1`` have one entry more: a test score ``s`` gets ``p0[searchsorted(grid, s, "right")]`` and
    ``p1[searchsorted(grid, s, "left")]``. Between grid points that is the isotonic fit with the test object
    beside the calibration objects; at a calibration score the test object ties with that score's group,
    and isotonic regression pools ties: with label 1 the pooled value equals the one just left of the group
    (the step of slope 1 it adds is never a vertex of the hull), with label 0 the one just right of it.

    ``weights`` are frequency weights (a weight of 2 is the row twice); the test object weighs 1.
    """
    keep = slice(None) if weights is None else weights > 0
    scores, targets = scores[keep], targets[keep]
    w = np.ones_like(scores) if weights is None else weights[keep]
    grid, inverse = np.unique(scores, return_inverse=True)
    mass = np.bincount(inverse, weights=w, minlength=grid.size)
    hits = np.bincount(inverse, weights=w * targets, minlength=grid.size)
    x = np.concatenate([[0.0], np.cumsum(mass)])
    p1 = _upper_slopes(x, np.concatenate([[0.0], np.cumsum(hits)]))
    # label 0 by symmetry: reverse the order and swap the labels, p0(s) = 1 - p1 of the mirror at -s
    mirrored_x = np.concatenate([[0.0], np.cumsum(mass[::-1])])
    mirrored_y = np.concatenate([[0.0], np.cumsum((mass - hits)[::-1])])
    p0 = 1.0 - _upper_slopes(mirrored_x, mirrored_y)[::-1]
    np.clip(p0, 0.0, 1.0, out=p0)
    np.clip(p1, 0.0, 1.0, out=p1)
    # a grid point between two positions with the same p0 and p1 changes nothing
    changes = (p0[1:] != p0[:-1]) | (p1[1:] != p1[:-1])
    keep_values = np.concatenate([[True], changes])
    return grid[changes], p0[keep_values], p1[keep_values]


class VennAbersCalibration(OneVsRestCurves, BaseCalibrator):
    r"""Inductive Venn–Abers predictor (IVAP; Vovk & Petej 2014), binary, and one-vs-rest for more classes.

    For a test score ``s`` the calibration set's isotonic regression is fitted twice, with the test object
    added with label 0 and with label 1; its value at ``s`` is ``p0`` and ``p1``, the two probabilities of
    the Venn predictor, one of which is perfectly calibrated under exchangeability. The answer merges them
    as Vovk, Petej & Fedorova (2015) recommend (minimax log loss),

    .. math:: p = \frac{p_1}{1 - p_0 + p_1}, \qquad p_0 \le p \le p_1,

    and :meth:`transform_intervals` gives ``[p0, p1]``. Both are step functions of ``s`` between calibration
    scores, precomputed at fit by the fast algorithm (linear after sorting; see :func:`venn_abers_curve`), so
    a row costs two binary searches per curve. ``p1 >= 1 / (n + 1)`` and ``p0 <= n / (n + 1)``, so ``p`` is
    never 0 or 1 and no test NLL is infinite.

    The score of class ``k`` is ``s_k = z_k - max_{j != k} z_j`` (:func:`rival_margins`): for a binary model
    the margin ``z1 - z0`` (one curve, answers ``[1 - p, p]``); with ``K > 2`` classes each class gets its
    own IVAP on ``(s_k, 1[y = k])`` and the merged ``p_k`` are divided by their row sum (Manokhin 2017's
    one-vs-rest with normalisation, as ``venn_abers``' ``one_vs_rest``). IVAPs only depend on the order of
    the scores, so ``s_k`` ranks rows as the softmax probability ``p_k`` would for binary models; it is used
    rather than ``ln p_k`` because it is computed exactly (a maximum and a subtraction), so the exported
    module finds the same grid interval as :meth:`transform` for every row, including rows equal to
    calibration rows.

    Argmax: for binary models ``p`` is non-decreasing in the margin (``p0`` and ``p1`` are), so the predicted
    class is a threshold on the margin, not necessarily at 0. With more classes the argmax may change.
    The per-class intervals of a multiclass model are the one-vs-rest IVAP's, before normalisation: the
    normalised ``p_k`` can fall outside them.

    Parameters
    ----------
    precision : int or None, default=None
        Round the scores to this many decimals before fitting and transforming (as ``venn_abers``'
        ``precision``): fewer distinct scores, a smaller document, a faster fit; ``None`` keeps them exact.
        At most 15.

    Attributes
    ----------
    grid_ : list of ndarray
        Per curve (one for binary models, else one per class), the increasing calibration scores where ``p0``
        or ``p1`` changes.
    p0_, p1_ : list of ndarray
        Per curve, ``len(grid_[k]) + 1`` values: ``p0`` at ``searchsorted(grid, s, "right")``, ``p1`` at
        ``searchsorted(grid, s, "left")``.
    num_classes_ : int
    convergence_ : dict
        ``{"converged": True, "method": "ivap_fast", "grid_points": [...]}`` (exact; no iterations).

    Notes
    -----
    ``sample_weight`` are frequency weights: a row of weight 2 counts as two calibration objects, and the
    test object counts as one. Rows of weight 0 are left out.

    References
    ----------
    - V. Vovk, I. Petej, "Venn-Abers predictors", UAI 2014.
    - V. Vovk, I. Petej, V. Fedorova, "Large-scale probabilistic predictors with and without guarantees of
      validity", NeurIPS 2015 (the fast algorithm, and the merged probability).
    - V. Manokhin, "Multi-class probabilistic classification using inductive and cross Venn-Abers
      predictors", COPA 2017.
    """

    method = "venn_abers"
    _option_names = ("precision",)
    _fitted_names = ("grid", "p0", "p1")

    grid_: list[np.ndarray]
    p0_: list[np.ndarray]
    p1_: list[np.ndarray]

    def __init__(self, *, precision: int | None = None) -> None:
        if precision is not None:
            precision = check_positive_int(
                precision, "precision", minimum=0, maximum=VENN_ABERS_MAX_PRECISION
            )
        self.precision = precision

    @property
    def _label(self) -> str:
        return "venn-abers"

    # -- scores -------------------------------------------------------------------------------------------

    def _scores(self, z: np.ndarray) -> np.ndarray:
        """``(curves, n)`` scores: the margin for binary models, else each class's rival margin."""
        if z.shape[1] == 1:
            scores = z.astype(np.float64).T
        elif z.shape[1] == 2:
            scores = (z[:, 1].astype(np.float64) - z[:, 0].astype(np.float64))[None, :]
        else:
            scores = rival_margins(z).T
        if self.precision is not None:
            # rint(s 10^d) / 10^d: three correctly rounded operations, which torch repeats bit for bit
            scale = 10.0**self.precision
            scores = np.rint(scores * scale) / scale
        return scores

    # -- fit and transform --------------------------------------------------------------------------------

    def _fit(self, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
        n_curves = self._fit_curves(z)
        scores = self._scores(z)
        curves = []
        for k in range(n_curves):
            cancellation.check()
            positive = 1 if n_curves == 1 else k
            curves.append(venn_abers_curve(scores[k], (y == positive).astype(np.float64), w))
        total = sum(grid.size for grid, _, _ in curves)
        if total > VENN_ABERS_MAX_GRID:
            raise InvalidInput(
                f"venn-abers would store {total:,} grid points, above the limit of {VENN_ABERS_MAX_GRID:,}: "
                "round the scores with option precision (e.g. 6) or fit on fewer rows",
                field="options",
            )
        self.grid_ = [grid for grid, _, _ in curves]
        self.p0_ = [p0 for _, p0, _ in curves]
        self.p1_ = [p1 for _, _, p1 in curves]
        self.convergence_ = {
            "converged": True,
            "method": "ivap_fast",
            "grid_points": [int(grid.size) for grid in self.grid_],
        }

    def _bounds(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(p0, p1)``, each ``(curves, n)``."""
        scores = self._scores(z)
        p0 = np.empty_like(scores)
        p1 = np.empty_like(scores)
        for k in range(scores.shape[0]):
            p0[k] = self.p0_[k][np.searchsorted(self.grid_[k], scores[k], side="right")]
            p1[k] = self.p1_[k][np.searchsorted(self.grid_[k], scores[k], side="left")]
        return p0, p1

    def _transform(self, z: np.ndarray) -> np.ndarray:
        p0, p1 = self._bounds(z)
        merged = p1 / (1.0 - p0 + p1)
        if merged.shape[0] == 1:
            return np.stack([1.0 - merged[0], merged[0]], axis=1)
        merged = merged.T
        return merged / merged.sum(axis=1, keepdims=True)

    def transform_intervals(self, logits: Any, *, validate: bool = True) -> np.ndarray:
        """The Venn–Abers interval of each class, float64 ``(n_samples, num_classes, 2)``: ``[..., 0]`` is
        ``p0``, ``[..., 1]`` is ``p1``.

        Binary models: ``[p0, p1]`` for class 1 and ``[1 - p1, 1 - p0]`` for class 0, which hold the answered
        probabilities. More classes: each class's one-vs-rest ``[p0_k, p1_k]``, before the normalisation
        that :meth:`transform` applies (see the class docstring).
        """
        self._check_fitted()
        z = self._check_transform_input(logits) if validate else logits
        p0, p1 = self._bounds(z)
        if p0.shape[0] == 1:
            return np.stack(
                [np.stack([1.0 - p1[0], 1.0 - p0[0]], axis=1), np.stack([p0[0], p1[0]], axis=1)], axis=1
            )
        return np.stack([p0.T, p1.T], axis=2)

    def torch_module(self) -> torch.nn.Module:
        """Grid rows padded with ``+inf`` (which no finite score reaches), looked up with
        ``torch.searchsorted`` as :meth:`transform` does."""
        self._check_fitted()
        from service.core.calibrators.torch_modules import VennAbersModule, padded_rows

        return VennAbersModule(
            padded_rows(self.grid_, fill_last=False, minimum=1),
            padded_rows(self.p0_, fill_last=True, minimum=2),
            padded_rows(self.p1_, fill_last=True, minimum=2),
            precision=-1 if self.precision is None else self.precision,
        )

    # -- document -----------------------------------------------------------------------------------------

    def _fitted_params(self) -> dict[str, Any]:
        return {
            "grid": [grid.tolist() for grid in self.grid_],
            "p0": [p0.tolist() for p0 in self.p0_],
            "p1": [p1.tolist() for p1 in self.p1_],
        }

    def _load_fitted(self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int) -> None:
        n_curves = self._n_curves(num_classes)
        self._check_curves(n_curves)
        for name in ("grid", "p0", "p1"):
            if not isinstance(params[name], list | tuple) or len(params[name]) != n_curves:
                raise InvalidInput(
                    f"calibrator document params.{name} must be a list of {n_curves} lists", field=name
                )
        grids, lows, highs = [], [], []
        for k in range(n_curves):
            grid = _doc_array(params["grid"][k], f"grid[{k}]", 1)
            p0 = _doc_array(params["p0"][k], f"p0[{k}]", 1)
            p1 = _doc_array(params["p1"][k], f"p1[{k}]", 1)
            if p0.size != grid.size + 1 or p1.size != grid.size + 1:
                raise InvalidInput(
                    f"calibrator document params.p0[{k}] and p1[{k}] must have one entry more than "
                    f"grid[{k}] ({grid.size + 1}), got {p0.size} and {p1.size}",
                    field="p0",
                )
            if (np.diff(grid) <= 0).any():
                raise InvalidInput(
                    f"calibrator document params.grid[{k}] must be strictly increasing", field="grid"
                )
            for name, values in (("p0", p0), ("p1", p1)):
                if (values < 0).any() or (values > 1).any() or (np.diff(values) < 0).any():
                    raise InvalidInput(
                        f"calibrator document params.{name}[{k}] must be non-decreasing values in [0, 1]",
                        field=name,
                    )
            # p0 <= p1 wherever a score can land (at a grid point p0 is read one interval to the right)
            if (p0[1:] > p1[:-1]).any() or (p0 > p1).any() or (p1 <= 0).any() or (p0 >= 1).any():
                raise InvalidInput(
                    f"calibrator document params.p0[{k}] and p1[{k}] must satisfy p0 <= p1, p1 > 0 and p0 < 1 "
                    "(a Venn-Abers interval)",
                    field="p0",
                )
            grids.append(grid)
            lows.append(p0)
            highs.append(p1)
        total = sum(grid.size for grid in grids)
        if total > VENN_ABERS_MAX_GRID:
            raise InvalidInput(
                f"calibrator document has {total:,} grid points, above the limit of {VENN_ABERS_MAX_GRID:,}",
                field="grid",
            )
        self.grid_, self.p0_, self.p1_ = grids, lows, highs
