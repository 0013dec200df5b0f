"""Non-parametric one-vs-rest calibrators: isotonic regression and histogram binning (Zadrozny & Elkan)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from service.core import cancellation
from service.core.calibrators.base import BaseCalibrator, _check_real, _doc_array, _doc_curves, _renormalise
from service.core.probability import softmax
from service.core.validation import check_choice, check_positive_int, check_work
from service.errors import InvalidInput

if TYPE_CHECKING:  # torch is imported only where a module is built
    import torch

ONE_VS_REST_MAX_CLASSES = 1_000
"""Most classes of isotonic regression and histogram binning: one curve is fitted per class, each with a
fixed overhead (about 0.7 ms for scikit-learn's isotonic regression: 100,000 classes took over 70 s), and
the document holds every curve."""
ONE_VS_REST_MAX_WORK = 25_000_000
"""Most ``rows x curves`` of a one-vs-rest fit: its float64 softmax is 8 bytes per entry (200 MB at the
limit), and each curve sorts its column (50,000 x 500 or 25,000 x 1,000: a few seconds)."""
HISTOGRAM_MAX_BINS = 1_000
"""Most bins of histogram binning (``n_bins``). Each bin is an edge and a value in the document, about
40 bytes of JSON: 1,000 bins x ``ONE_VS_REST_MAX_CLASSES`` curves is ~40 MB, within the 64 MiB upload
limit (1e6 bins made a 77 MB document for one curve, and 1e9 grew the server to 23 GB). Beyond a few
hundred bins most bins hold no fit sample anyway."""


class OneVsRestCurves:
    """The bounds of a calibrator with one curve per class (one curve for a binary model): at most
    :data:`ONE_VS_REST_MAX_CLASSES` curves, and :data:`ONE_VS_REST_MAX_WORK` rows x curves per fit."""

    _label: str

    @staticmethod
    def _n_curves(num_classes: int) -> int:
        return 1 if num_classes == 2 else num_classes

    def _check_curves(self, n_curves: int) -> None:
        if n_curves > ONE_VS_REST_MAX_CLASSES:
            raise InvalidInput(
                f"{self._label} is limited to {ONE_VS_REST_MAX_CLASSES:,} classes (one curve each); got "
                f"{n_curves:,}: use temperature or vector scaling",
                field="num_classes",
            )

    def _fit_curves(self, z: np.ndarray) -> int:
        """The number of curves a fit on logits ``z`` makes; InvalidInput when it is beyond the bounds."""
        n_curves = self._n_curves(max(z.shape[1], 2))
        self._check_curves(n_curves)
        check_work(
            z.shape[0] * n_curves,
            ONE_VS_REST_MAX_WORK,
            "logits",
            f"{self._label} work ({z.shape[0]:,} rows x {n_curves:,} curves)",
        )
        return n_curves


class _OneVsRest(OneVsRestCurves, BaseCalibrator):
    """Shared shape of the one-vs-rest calibrators that map each class's softmax probability.

    Binary models map ``P(y = 1)`` only and return ``[1 - p, p]``. With more classes every class is mapped
    and the rows are renormalised; a row that maps to all zeros keeps its uncalibrated softmax row (the
    calibrators have no evidence there, and the model's own ranking beats a uniform guess).
    """

    @staticmethod
    def _probabilities(z: np.ndarray) -> np.ndarray:
        return softmax(z)

    @abstractmethod
    def _fit_curve(
        self, scores: np.ndarray, targets: np.ndarray, w: np.ndarray | None
    ) -> tuple[Any, Any]: ...

    @abstractmethod
    def _apply_curve(self, k: int, scores: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _set_curves(self, curves: list[tuple[Any, Any]]) -> None: ...

    floor: float | str = 0.0

    def _floor_for(self, n_rows: int) -> float:
        """The probability floor of the curves: the ``floor`` option, ``"auto"`` being ``1 / (2 n)``."""
        return 0.5 / max(n_rows, 1) if self.floor == "auto" else float(self.floor)

    def _fit(self, z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
        self.floor_ = self._floor_for(z.shape[0])
        self._fit_curves(z)
        p = self._probabilities(z)
        if p.shape[1] == 2:
            curves = [self._fit_curve(p[:, 1], (y == 1).astype(np.float64), w)]
        else:
            curves = []
            for k in range(p.shape[1]):
                cancellation.check()
                curves.append(self._fit_curve(p[:, k], (y == k).astype(np.float64), w))
        self._set_curves(curves)
        self.convergence_ = {"converged": True, "method": self._fit_method, "floor": self.floor_}

    _fit_method: ClassVar[str]

    def _transform(self, z: np.ndarray) -> np.ndarray:
        p = self._probabilities(z)
        if p.shape[1] == 2:
            positive = self._apply_curve(0, p[:, 1])
            return np.stack([1.0 - positive, positive], axis=1)
        calibrated = np.empty_like(p)
        for k in range(p.shape[1]):
            calibrated[:, k] = self._apply_curve(k, p[:, k])
        return _renormalise(calibrated, p)


class IsotonicCalibration(_OneVsRest):
    """Isotonic regression of each class's softmax probability, one-vs-rest (Zadrozny & Elkan 2002).

    Each class gets scikit-learn's ``IsotonicRegression(out_of_bounds="clip", y_min=floor, y_max=1 - floor)``
    fitted on ``(softmax(z)[:, k], 1[y = k])``. Only its knots (``X_thresholds_``, ``y_thresholds_``) are kept and
    ``transform`` interpolates them with :func:`numpy.interp` (linear between knots, clipped beyond, as the
    scikit-learn object predicts), so documents need no scikit-learn object. See :class:`_OneVsRest` for
    binary models and renormalisation.

    Parameters
    ----------
    floor : float or "auto", default="auto"
        Least calibrated probability of a class (and ``1 - floor`` the most), in ``[0, 0.5)``. Without one, the
        lowest block of a class's curve is 0 wherever no fit sample of that class fell, and every test row
        of that class landing there has probability 0 and an infinite NLL (4 to 104 test rows of each real
        set in ``tests/data``). ``"auto"`` is ``1 / (2 n)`` for ``n`` fit rows: half of what one observation
        weighs, below anything the fit data can tell apart from 0. ``0`` gives the plain isotonic curve.

    Attributes
    ----------
    x_thresholds_ : list of ndarray
        Knots per calibrated class (one entry, class 1, for binary models).
    y_thresholds_ : list of ndarray
    num_classes_ : int
    floor_ : float
        The floor used (``"auto"`` resolved).
    convergence_ : dict
        ``{"converged": True, "method": "isotonic_pava", "floor": floor_}``.
    """

    method = "isotonic"
    _option_names = ("floor",)
    _fitted_names = ("x_thresholds", "y_thresholds")
    _fit_method = "isotonic_pava"

    x_thresholds_: list[np.ndarray]
    y_thresholds_: list[np.ndarray]

    def __init__(self, *, floor: float | str = "auto") -> None:
        self.floor = _check_floor(floor)

    def _fit_curve(
        self, scores: np.ndarray, targets: np.ndarray, w: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.isotonic import IsotonicRegression

        regression = IsotonicRegression(out_of_bounds="clip", y_min=self.floor_, y_max=1.0 - self.floor_)
        regression.fit(scores, targets, sample_weight=w)
        return (
            np.asarray(regression.X_thresholds_, dtype=np.float64),
            np.asarray(regression.y_thresholds_, dtype=np.float64),
        )

    def _set_curves(self, curves: list[tuple[Any, Any]]) -> None:
        self.x_thresholds_ = [x for x, _ in curves]
        self.y_thresholds_ = [y for _, y in curves]

    def _apply_curve(self, k: int, scores: np.ndarray) -> np.ndarray:
        return np.interp(scores, self.x_thresholds_[k], self.y_thresholds_[k])

    def torch_module(self) -> torch.nn.Module:
        """Knot rows padded with their last knot (which changes nothing), interpolated as numpy.interp."""
        self._check_fitted()
        from service.core.calibrators.torch_modules import OneVsRestModule, padded_rows

        return OneVsRestModule(
            padded_rows(self.x_thresholds_, fill_last=True, minimum=2),
            padded_rows(self.y_thresholds_, fill_last=True, minimum=2),
            interpolate=True,
        )

    def _fitted_params(self) -> dict[str, Any]:
        return {
            "x_thresholds": [x.tolist() for x in self.x_thresholds_],
            "y_thresholds": [y.tolist() for y in self.y_thresholds_],
        }

    def _load_fitted(self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int) -> None:
        self._check_curves(self._n_curves(num_classes))
        xs, ys = _doc_curves(
            params, "x_thresholds", "y_thresholds", self._n_curves(num_classes), monotone=True
        )
        self._set_curves(list(zip(xs, ys, strict=True)))


_BINNINGS = ("width", "mass")


def _check_floor(floor: object) -> float | str:
    if isinstance(floor, str):
        return check_choice(floor, "floor", ("auto",))
    value = _check_real(floor, "floor", minimum=0.0)
    if value >= 0.5:
        raise InvalidInput(
            f"floor must be below 0.5 (a probability and its complement), got {value!r}", field="floor"
        )
    return value


class HistogramBinning(_OneVsRest):
    """Histogram binning of each class's softmax probability, one-vs-rest (Zadrozny & Elkan 2001).

    Each class's probability axis is cut into ``n_bins`` bins ``(e_i, e_{i+1}]`` (the first bin includes 0),
    and a probability is replaced by the (weighted) frequency of that class among the fit samples in its
    bin. ``binning="width"`` uses equal-width bins on [0, 1]; ``"mass"`` puts the edges at the quantiles of
    that class's fit probabilities (ties merge bins, so a class may get fewer). A bin no fit sample fell in
    maps to its own centre: without evidence the model's score is kept (roughly), not replaced by a prior.
    See :class:`_OneVsRest` for binary models and renormalisation.

    Parameters
    ----------
    n_bins : int, default=15
        At most :data:`HISTOGRAM_MAX_BINS`, on fit and on upload (bins per class in the document).
    binning : {"width", "mass"}, default="width"
    prior_strength : float, default=1.0
        Pseudo-observations at the class's base rate ``pi`` added to every bin that holds fit samples: a bin
        of ``m`` samples (weight), ``h`` of them of the class, maps to ``(h + a pi) / (m + a)`` (the posterior
        mean of a beta prior of mean ``pi`` and strength ``a``). ``0`` gives the raw frequencies.
    floor : float or "auto", default="auto"
        Least calibrated probability (``1 - floor`` the most), in ``[0, 0.5)``, as for
        :class:`IsotonicCalibration`; ``"auto"`` is ``1 / (2 n)`` for ``n`` fit rows.

    Attributes
    ----------
    bin_edges_ : list of ndarray
        Edges per calibrated class, from 0 to 1 (one entry, class 1, for binary models).
    bin_values_ : list of ndarray
        Calibrated probability per bin.
    num_classes_ : int
    floor_ : float
        The floor used (``"auto"`` resolved).
    convergence_ : dict
        ``{"converged": True, "method": "histogram", "floor": floor_}``.
    """

    method = "histogram"
    _option_names = ("n_bins", "binning", "prior_strength", "floor")
    _fitted_names = ("bin_edges", "bin_values")
    _fit_method = "histogram"

    bin_edges_: list[np.ndarray]
    bin_values_: list[np.ndarray]

    def __init__(
        self,
        *,
        n_bins: int = 15,
        binning: str = "width",
        prior_strength: float = 1.0,
        floor: float | str = "auto",
    ) -> None:
        self.n_bins = check_positive_int(n_bins, "n_bins", maximum=HISTOGRAM_MAX_BINS)
        self.binning = check_choice(binning, "binning", _BINNINGS)
        self.prior_strength = _check_real(prior_strength, "prior_strength", minimum=0.0, maximum=1e6)
        self.floor = _check_floor(floor)

    @property
    def _label(self) -> str:
        return "histogram binning"

    @staticmethod
    def _bin_index(edges: np.ndarray, scores: np.ndarray) -> np.ndarray:
        # side="left" on the inner edges puts a score equal to e_i into bin i - 1: bins are (e_i, e_{i+1}].
        return np.searchsorted(edges[1:-1], scores, side="left")

    def _fit_curve(
        self, scores: np.ndarray, targets: np.ndarray, w: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.binning == "width":
            edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        else:
            inner = np.unique(np.quantile(scores, np.linspace(0.0, 1.0, self.n_bins + 1)[1:-1]))
            edges = np.concatenate([[0.0], inner[(inner > 0.0) & (inner < 1.0)], [1.0]])
        n_bins = edges.size - 1
        index = self._bin_index(edges, scores)
        weights = np.ones_like(scores) if w is None else w
        mass = np.bincount(index, weights=weights, minlength=n_bins)
        hits = np.bincount(index, weights=weights * targets, minlength=n_bins)
        centres = 0.5 * (edges[:-1] + edges[1:])
        # Bayesian smoothing: each bin's frequency with prior_strength pseudo-observations at the class's
        # base rate, so a bin of a few samples, none of the class, does not say "never"
        prior = float(weights @ targets) / float(weights.sum()) if weights.sum() > 0 else 0.5
        values = np.divide(
            hits + self.prior_strength * prior,
            mass + self.prior_strength,
            out=centres.copy(),
            where=mass > 0,
        )
        return edges, np.clip(values, self.floor_, 1.0 - self.floor_)

    def _set_curves(self, curves: list[tuple[Any, Any]]) -> None:
        self.bin_edges_ = [edges for edges, _ in curves]
        self.bin_values_ = [values for _, values in curves]

    def _apply_curve(self, k: int, scores: np.ndarray) -> np.ndarray:
        return self.bin_values_[k][self._bin_index(self.bin_edges_[k], scores)]

    def torch_module(self) -> torch.nn.Module:
        """Inner edges padded with +inf (which no probability reaches), bins found as :meth:`_bin_index`."""
        self._check_fitted()
        from service.core.calibrators.torch_modules import OneVsRestModule, padded_rows

        return OneVsRestModule(
            padded_rows([edges[1:-1] for edges in self.bin_edges_], fill_last=False, minimum=1),
            padded_rows(self.bin_values_, fill_last=True, minimum=1),
            interpolate=False,
        )

    def _fitted_params(self) -> dict[str, Any]:
        return {
            "bin_edges": [edges.tolist() for edges in self.bin_edges_],
            "bin_values": [values.tolist() for values in self.bin_values_],
        }

    def _load_fitted(self, document: Mapping[str, Any], params: Mapping[str, Any], num_classes: int) -> None:
        n_curves = self._n_curves(num_classes)
        self._check_curves(n_curves)
        for name in ("bin_edges", "bin_values"):
            if not isinstance(params[name], list | tuple) or len(params[name]) != n_curves:
                raise InvalidInput(
                    f"calibrator document params.{name} must be a list of {n_curves} lists", field=name
                )
        edges_list, values_list = [], []
        for k in range(n_curves):
            edges = _doc_array(params["bin_edges"][k], f"bin_edges[{k}]", 1)
            values = _doc_array(params["bin_values"][k], f"bin_values[{k}]", 1)
            if edges.size < 2 or values.size != edges.size - 1:
                raise InvalidInput(
                    f"calibrator document params.bin_values[{k}] must have one entry per bin "
                    f"(len(bin_edges[{k}]) - 1 = {edges.size - 1}), got {values.size}",
                    field="bin_values",
                )
            if values.size > HISTOGRAM_MAX_BINS:
                raise InvalidInput(
                    f"calibrator document params.bin_values[{k}] has {values.size:,} bins, above the limit "
                    f"of {HISTOGRAM_MAX_BINS:,}",
                    field="bin_values",
                )
            if (np.diff(edges) < 0).any():
                raise InvalidInput(
                    f"calibrator document params.bin_edges[{k}] must be sorted", field="bin_edges"
                )
            if edges[0] < 0 or edges[-1] > 1:
                raise InvalidInput(
                    f"calibrator document params.bin_edges[{k}] must lie in [0, 1] (they are probabilities)",
                    field="bin_edges",
                )
            if (values < 0).any() or (values > 1).any():
                raise InvalidInput(
                    f"calibrator document params.bin_values[{k}] must lie in [0, 1]", field="bin_values"
                )
            edges_list.append(edges)
            values_list.append(values)
        self._set_curves(list(zip(edges_list, values_list, strict=True)))
