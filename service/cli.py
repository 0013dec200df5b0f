"""``calibserve``: fit, apply and evaluate calibrators from the command line, check drift in CI, serve the API.

Commands
--------
``fit``       fit a calibrator on labelled scores and write its document (JSON)
``apply``     calibrated probabilities for scores (``.npy``, ``.csv`` or ``.jsonl`` by the output's extension)
``evaluate``  figures before/after calibration, optional thresholds (``--fail-on``) and baseline comparison
``drift``     ``evaluate`` against a baseline report (``--baseline`` required; default ``--max-increase ece=0.01``)
``monitor``   check the calibration of a running service's live outcomes (client mode only)
``serve``     run the HTTP service
``store copy SRC DST``  copy every model and calibrator version between stores (a directory, ``file://`` or
              ``s3://bucket/prefix``): idempotent, each document's sha256 checked
``export``    download a model from a running service (client mode only)

``fit``, ``apply``, ``evaluate`` and ``drift`` work on local files, or, with ``--server URL --model NAME``,
through a running service (the API key comes from ``--api-key`` or ``CALIBSERVE_API_KEY``).

Exit codes: 0 every threshold holds, 1 a threshold is breached, 2 the command itself failed (unreadable file,
bad shapes, NaN, bad option), with one line ``calibserve: error: <reason>`` on stderr.

``monitor`` judges a window of labelled outcomes only when the server does (``CALIBSERVE_MONITORING_MIN_OUTCOMES``
outcomes at least): a window with fewer is said so on stderr and exits 0, its checks reported ``unknown``, since
a quiet hour is no calibration failure; ``--require-outcomes`` makes it a breach (exit 1) for pipelines that
expect traffic. Without ``--fail-on`` its checks are the server's own drift rules (``CALIBSERVE_MONITORING_DRIFT``).

Heavy modules (numpy numerics, matplotlib, the web stack) are imported inside the commands, so that
``calibserve --help`` and a failing flag answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

# The method names come from the calibrators' registry (numpy and scipy.special only: the fits' heavier
# imports, scipy.optimize, scikit-learn and torch, wait for a fit).
from service.core.calibrators import METHODS, MULTILABEL_METHODS
from service.core.metrics import MAX_BOOTSTRAP_RESAMPLES, MAX_BOOTSTRAP_WORK, MAX_N_BINS
from service.errors import CalibserveError
from service.names import validate_model_name

PROG = "calibserve"
DEFAULT_MAX_INCREASE = "ece=0.01"
EXIT_OK, EXIT_BREACHED, EXIT_FAILED = 0, 1, 2

logger = logging.getLogger("calibserve.cli")


class CommandError(CalibserveError):
    """A command cannot run as asked (conflicting or missing flags): exit code 2."""


# ------------------------------------------------------------------------------------------------ helpers


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal (never in CI logs)."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        filled = int(self.width * min(done, total) / total)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {100 * min(done, total) // total:3d}%")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _one_line(exc: BaseException) -> str:
    """A single-line reason for an error, without traceback."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    elif type(exc).__name__ == "ValidationError" and hasattr(exc, "errors"):  # pydantic (Settings)
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "settings"
        reason = f"{where}: {first.get('msg', 'invalid value')}"
    else:
        reason = str(exc) or type(exc).__name__
    return " ".join(reason.split())


def _handled_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [CalibserveError, OSError, ValueError]
    if "httpx" in sys.modules:  # client mode: connection refused, timeouts
        errors.append(sys.modules["httpx"].HTTPError)
    return tuple(errors)


def _parse_option(text: str) -> tuple[str, Any]:
    """``--option key=value``: the value is read as JSON when it parses (numbers, true/false), else a string."""
    import orjson

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise CommandError(f"--option {text!r} must look like key=value")
    try:
        return key.strip(), orjson.loads(value)
    except orjson.JSONDecodeError:
        return key.strip(), value


def _scores_kind(args: argparse.Namespace) -> tuple[str, str]:
    """(kind, spec): logits, probabilities or (TorchScript) model inputs, as the user's flag says."""
    if args.logits is not None:
        return "logits", args.logits
    if getattr(args, "inputs", None) is not None:
        return "inputs", args.inputs
    return "probabilities", args.probabilities


def _read_scores(args: argparse.Namespace) -> tuple[Any, bool]:
    from service import io

    kind, spec = _scores_kind(args)
    progress = Progress(f"reading {spec}")
    try:
        return io.read_scores(spec, kind=kind, progress=progress), kind == "logits"
    finally:
        progress.close()


def _model_logits(args: argparse.Namespace, inputs: Any) -> Any:
    """Logits of TorchScript model ``--model`` of ``--models-dir`` for ``inputs``, run here on the CPU."""
    from service.errors import NotFound
    from service.registry import ModelRegistry

    if not args.model:
        raise CommandError(
            "--inputs needs --model NAME (a TorchScript model of --models-dir, or with --server)"
        )
    registry = ModelRegistry(args.models_dir, device="cpu")
    registry.load_all()
    try:
        return registry.predict(args.model, inputs)
    except NotFound:
        raise CommandError(
            f"--models-dir {args.models_dir} has no TorchScript model {args.model!r}"
        ) from None


def _read_labelled(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """Scores, labels and their kind (logits, probabilities, or inputs for the server to run), validated
    here (numpy only) so that bad data fails before the numerics load. Local ``--inputs`` are run through
    the model here and come back as logits."""
    from service.core.validation import check_labelled

    kind, _ = _scores_kind(args)
    scores, _ = _read_scores(args)
    labels = _read_labels(args)
    if kind == "inputs":
        if args.server:
            return scores, labels, kind
        scores, kind = _model_logits(args, scores), "logits"
    if _multilabel(args):
        return _read_multilabel(scores, labels, kind)
    scores, labels, _ = check_labelled(scores, labels, from_logits=kind == "logits")
    return scores, labels, kind


def _multilabel(args: argparse.Namespace, document: dict | None = None) -> bool:
    """Whether the command is about a multi-label model: ``--task multilabel``, or a calibrator document
    of one."""
    return getattr(args, "task", None) == "multilabel" or (
        isinstance(document, dict) and document.get("task") == "multilabel"
    )


def _read_multilabel(scores: Any, labels: Any, kind: str) -> tuple[Any, Any, str]:
    """A multi-label model's scores (per-label logits or probabilities) and its 0/1 label matrix."""
    from service.core.multilabel import check_label_matrix
    from service.multilabel_workflows import scores_to_logits

    if kind == "probabilities":
        from service.core.multilabel import check_label_probabilities

        scores = check_label_probabilities(scores)
    else:
        scores = scores_to_logits(scores, from_logits=True)
    if getattr(labels, "ndim", None) == 1 and scores.shape[1] == 1:  # one label: a (n, 1) matrix read flat
        labels = labels[:, None]
    return scores, check_label_matrix(labels, scores.shape[0], scores.shape[1]), kind


def _read_labels(args: argparse.Namespace) -> Any:
    from service import io

    _, scores_spec = _scores_kind(args)
    spec = args.labels or io.labels_spec_from_scores(scores_spec)
    if spec is None:
        raise CommandError(f"--labels is required ({scores_spec} cannot hold labels)")
    progress = Progress(f"reading {spec}")
    try:
        return io.read_labels(spec, progress=progress)
    finally:
        progress.close()


def _client(args: argparse.Namespace) -> Any:
    from service.client import API_KEY_ENV, CalibserveClient

    if not args.model:
        raise CommandError("--server needs --model NAME")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    return CalibserveClient(args.server, api_key=api_key, timeout=args.timeout)


def _check_client_flags(args: argparse.Namespace, *, local_model: bool = False) -> None:
    """Refuse client-mode flags without ``--server`` rather than ignore them (``fit`` names its document)."""
    if args.server is not None:
        return
    given = {
        "--model": None if local_model else args.model,
        "--version": getattr(args, "version", None),
        "--no-activate": getattr(args, "no_activate", False) or None,
        "--api-key": args.api_key,
    }
    misplaced = [flag for flag, value in given.items() if value is not None]
    if misplaced:
        verb = "needs" if len(misplaced) == 1 else "need"
        raise CommandError(f"{' and '.join(misplaced)} {verb} --server URL (client mode)")


def _write_bytes(path: str, data: bytes) -> None:
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        Path(path).write_bytes(data)


# --------------------------------------------------------------------------------------------------- fit


def cmd_fit(args: argparse.Namespace) -> int:
    import orjson

    _check_client_flags(args, local_model=True)
    options = dict(_parse_option(text) for text in args.option or [])
    conformal = _conformal_request(args)
    scores, labels, kind = _read_labelled(args)
    if args.server:
        with _client(args) as client:
            document = client.fit(
                args.model,
                labels=labels,
                method=args.method,
                activate=not args.no_activate,
                options=options or None,
                conformal=conformal,
                conformal_fraction=args.conformal_fraction,
                **{kind: scores},
            )
    elif _multilabel(args):
        if conformal is not None:
            raise CommandError("--conformal: prediction sets are for softmax models, not --task multilabel")
        from service import multilabel_workflows

        document = multilabel_workflows.fit_document(
            scores,
            labels,
            from_logits=kind == "logits",
            method=args.method,
            options=options,
            model=args.model,
        )
    elif conformal is not None:
        from service.workflows import fit_conformal_document

        document = fit_conformal_document(
            scores,
            labels,
            conformal=conformal,
            conformal_fraction=args.conformal_fraction,
            from_logits=kind == "logits",
            method=args.method,
            options=options,
            model=args.model,
        )
    else:
        from service.workflows import fit_document

        document = fit_document(
            scores,
            labels,
            from_logits=kind == "logits",
            method=args.method,
            options=options,
            model=args.model,
        )
    _write_bytes(args.out, orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
    fit = document.get("fit") or {}
    before, after = fit.get("before") or {}, fit.get("after") or {}
    parameter = f" T = {document['temperature']:.6g}" if document.get("temperature") is not None else ""
    logger.info(
        "fitted %s%s on %s samples: ece %.4g -> %.4g, nll %.4g -> %.4g",
        document.get("method"),
        parameter,
        fit.get("n", "?"),
        before.get("ece", float("nan")),
        after.get("ece", float("nan")),
        before.get("nll", float("nan")),
        after.get("nll", float("nan")),
    )
    sets = document.get("conformal")
    if sets:
        threshold = sets["threshold"] if sets.get("threshold") is not None else sets.get("thresholds")
        logger.info(
            "conformal %s sets at alpha %g%s on %s held-out rows: threshold %s",
            sets["score"],
            sets["alpha"],
            " (mondrian)" if sets.get("mondrian") else "",
            sets.get("n"),
            threshold,
        )
    return EXIT_OK


_CONFORMAL_FLAGS = (
    "alpha",
    "mondrian",
    "randomized",
    "k_reg",
    "raps_lambda",
    "conformal_fraction",
    "conformal_seed",
)


def _conformal_request(args: argparse.Namespace) -> dict[str, Any] | None:
    """The fit's ``conformal`` object from ``--conformal SCORE`` and its flags (None without it)."""
    if args.conformal is None:
        given = [name for name in _CONFORMAL_FLAGS if getattr(args, name) not in (None, False)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise CommandError(f"{flag} goes with --conformal lac|aps|raps")
        return None
    request: dict[str, Any] = {"score": args.conformal, "alpha": 0.1 if args.alpha is None else args.alpha}
    if args.mondrian:
        request["mondrian"] = True
    if args.randomized:
        request["randomized"] = True
    if args.k_reg is not None:
        request["k_reg"] = args.k_reg
    if args.raps_lambda is not None:
        request["lambda"] = args.raps_lambda
    if args.conformal_seed is not None:
        request["seed"] = args.conformal_seed
    return request


# ------------------------------------------------------------------------------------------------- apply


def cmd_apply(args: argparse.Namespace) -> int:
    import numpy as np

    from service import io

    _check_client_flags(args)
    if Path(args.out).suffix.lower() not in io.WRITE_SUFFIXES:
        raise CommandError(f"--out {args.out}: use a {', '.join(io.WRITE_SUFFIXES)} file name")
    from service.core.validation import check_scores

    if args.sets and Path(args.sets).suffix.lower() not in io.WRITE_SUFFIXES:
        raise CommandError(f"--sets {args.sets}: use a {', '.join(io.WRITE_SUFFIXES)} file name")
    scores, from_logits = _read_scores(args)
    document = None
    if not args.server and args.calibrator:
        from service import reports

        document = reports.load_json(args.calibrator)
    if _multilabel(args, document):  # per-label scores: rows need not sum to 1
        from service import multilabel_workflows

        scores = multilabel_workflows.scores_to_logits(scores, from_logits=from_logits, transform=True)
        from_logits = True
    else:
        scores = check_scores(scores, from_logits=from_logits)
    intervals = None
    if args.intervals_out and Path(args.intervals_out).suffix.lower() != ".npy":
        raise CommandError(f"--intervals-out {args.intervals_out}: use a .npy file name (N x K x 2)")
    sets = None
    if args.server:
        with _client(args) as client:
            answer = client.calibrate(
                args.model,
                version=args.version,
                seed=args.seed,
                intervals=bool(args.intervals_out),
                **{"logits" if from_logits else "probabilities": scores},
            )
        probabilities = answer["probabilities"]
        if args.intervals_out:
            intervals = np.asarray(answer["probability_intervals"], dtype=np.float64)
        if answer.get("prediction_sets") is not None:
            sets = np.zeros(probabilities.shape, dtype=np.uint8)
            for row, members in enumerate(answer["prediction_sets"]):
                sets[row, members] = 1
    else:
        if not args.calibrator:
            raise CommandError("apply needs --calibrator FILE (or --server URL --model NAME)")
        from service import workflows

        calibrator = workflows.load_calibrator(document)
        if _multilabel(args, document):
            from service import multilabel_workflows

            probabilities = multilabel_workflows.calibrate(calibrator, scores)
        else:
            probabilities = workflows.calibrate(calibrator, scores, from_logits=from_logits)
            fitted = workflows.load_conformal(document)
            if fitted is not None:
                sets = workflows.conformal_sets(fitted, probabilities, args.seed).astype(np.uint8)
        if args.intervals_out:
            intervals = _local_intervals(calibrator, scores, from_logits=from_logits)
    io.write_array(args.out, probabilities)
    logger.info("wrote %d x %d probabilities to %s", *probabilities.shape, args.out)
    if intervals is not None:
        with Path(args.intervals_out).open("wb") as handle:
            np.save(handle, intervals, allow_pickle=False)
        logger.info("wrote %d x %d x 2 probability intervals to %s", *intervals.shape[:2], args.intervals_out)
    if args.sets:
        if sets is None:
            raise CommandError(
                "--sets: the calibrator has no conformal prediction sets (fit it with --conformal)"
            )
        io.write_array(args.sets, sets)
        logger.info(
            "wrote %d x %d prediction sets (1: the class is in the row's set) to %s", *sets.shape, args.sets
        )
    return EXIT_OK


def _local_intervals(calibrator: Any, scores: Any, *, from_logits: bool) -> Any:
    """``[p0, p1]`` per row and class of a venn_abers calibrator document (CommandError for other methods)."""
    from service import workflows

    if not hasattr(calibrator, "transform_intervals"):
        raise CommandError(
            f"--intervals-out: probability intervals come from a venn_abers calibrator, not {calibrator.method}"
        )
    return calibrator.transform_intervals(workflows.scores_to_logits(scores, from_logits=from_logits))


# -------------------------------------------------------------------------------------- evaluate / drift


def _outputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(format, path) for each report output; path ``-`` is stdout."""
    from service import reports

    outs = args.out or []
    if args.format and len(outs) > 1:
        raise CommandError("--format applies to one --out; with several, each file's extension decides")
    if not outs:
        return [(args.format or "json", "-")]
    return [
        (args.format or ("json" if path == "-" else reports.format_for_path(path)), path) for path in outs
    ]


def _baseline(path: str, document: dict) -> dict:
    """An evaluation report as is, or a calibrator document's fit-time figures."""
    from service import workflows

    if document.get("kind") == workflows.REPORT_KIND:
        return document
    if isinstance(document.get("fit"), dict) and "method" in document:
        return workflows.fit_time_baseline(document)
    raise CommandError(
        f"--baseline {path} is neither a calibserve evaluation report nor a calibrator document"
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``evaluate`` and ``drift`` (which only makes ``--baseline`` required)."""
    from service import reports

    _check_client_flags(args, local_model=getattr(args, "inputs", None) is not None)
    if args.max_increase and not args.baseline:
        raise CommandError("--max-increase needs --baseline REPORT")
    if args.calibrator and args.server:
        raise CommandError(
            "--calibrator is for local files; with --server the model's active calibrator is used"
        )
    _check_plot(args.plot)
    outputs = _outputs(args)
    conformal = _conformal_request(args) if hasattr(args, "conformal") else None
    document = reports.load_json(args.calibrator) if args.calibrator else None
    baseline_document = reports.load_json(args.baseline) if args.baseline else None
    if _multilabel(args, document) and not getattr(args, "task", None):
        args.task = "multilabel"  # the calibrator document says so
    scores, labels, kind = _read_labelled(args)
    from_logits = kind == "logits"

    from service import workflows

    # every flag is checked before the (possibly long) evaluation starts
    for expression in args.fail_on or []:
        if workflows.Threshold.parse(expression).bound is not None and not args.bootstrap:
            raise CommandError(
                f"--fail-on {expression}: a bound of a bootstrap interval needs --bootstrap N (e.g. 1000)"
            )
    baseline = _baseline(args.baseline, baseline_document) if baseline_document is not None else None
    max_increase = (
        workflows.parse_max_increase(args.max_increase or DEFAULT_MAX_INCREASE)
        if baseline is not None
        else {}
    )
    calibrator = workflows.load_calibrator(document) if document is not None else None
    segments = None
    if args.segments:
        from service import io

        segments = io.read_segments(args.segments)
    for expression in args.fail_on or []:
        if workflows.Threshold.parse(expression).worst and segments is None:
            raise CommandError(f"--fail-on {expression}: the worst segment needs --segments FILE")

    progress = Progress("bootstrap")
    try:
        if args.server:
            with _client(args) as client:
                report = client.evaluate(
                    args.model,
                    labels=labels,
                    version=args.version,
                    n_bins=args.bins,
                    binning=args.binning,
                    bootstrap=args.bootstrap,
                    seed=args.seed,
                    nll_clip=args.nll_clip,
                    ece_convention=args.ece_convention,
                    per_class_tests=args.per_class_tests,
                    segments=segments,
                    min_segment_size=args.min_segment_size,
                    conformal=conformal,
                    conformal_fraction=getattr(args, "conformal_fraction", None),
                    **{kind: scores},
                )
        elif _multilabel(args):
            from service import multilabel_workflows

            report = multilabel_workflows.evaluate(
                scores,
                labels,
                from_logits=from_logits,
                calibrator=calibrator,
                calibrator_document=document,
                n_bins=args.bins,
            )
        else:
            report = workflows.evaluate(
                scores,
                labels,
                from_logits=from_logits,
                calibrator=calibrator,
                calibrator_document=document,
                n_bins=args.bins,
                binning=args.binning,
                bootstrap=args.bootstrap,
                seed=args.seed,
                nll_clip=args.nll_clip,
                ece_convention=args.ece_convention,
                per_class_tests=args.per_class_tests,
                segments=segments,
                min_segment_size=args.min_segment_size,
                progress=progress,
                conformal=conformal,
                conformal_fraction=getattr(args, "conformal_fraction", None),
            )  # with a document that has fit-time figures, the report holds its drift against them
    finally:
        progress.close()

    checks = workflows.check_thresholds(report, args.fail_on or [])
    if baseline is not None:
        if baseline.get("calibrated") and not report.get("calibrated"):
            logger.warning(
                "the baseline has calibrated figures but this run has none (give --calibrator FILE, or "
                "--server): drift is checked on the uncalibrated figures against the baseline's uncalibrated ones"
            )
        checks += workflows.check_drift(report, baseline, max_increase)
    report = workflows.apply_checks(report, checks)
    _write_reports(report, outputs, args.plot)
    return _conclude(report)


def _check_plot(path: str | None) -> None:
    if path and Path(path).suffix.lower() not in (".png", ".svg"):
        raise CommandError(f"--plot {path}: use a .png or .svg file name")


def _write_reports(report: dict, outputs: list[tuple[str, str]], plot: str | None) -> None:
    """Each report output, and the reliability diagram (``--plot``; embedded in HTML pages) when the report
    has bins to draw (a monitoring window without outcomes has none: said so, and left out)."""
    from service import reports

    figure_png = None
    wants_html = any(format == "html" for format, _ in outputs)
    if report.get("task") == "multilabel" and (plot or wants_html):  # one diagram per label
        from service.plots import label_diagrams

        if plot:
            image = label_diagrams(report, path=plot)
            figure_png = image if plot.lower().endswith(".png") else None
        if figure_png is None and wants_html:
            figure_png = label_diagrams(report, format="png")
    elif (plot or wants_html) and not report.get("reliability"):
        logger.warning("no outcomes to draw: the report has no reliability diagram")
    elif plot or wants_html:
        from service.plots import reliability_diagram

        if plot:
            image = reliability_diagram(report, path=plot)
            figure_png = image if plot.lower().endswith(".png") else None
        if figure_png is None and wants_html:
            figure_png = reliability_diagram(report, format="png")
    for format, path in outputs:
        _write_bytes(path, reports.render(report, format, figure_png=figure_png))


def _conclude(report: dict) -> int:
    """The breached checks and the summary on stderr; the exit code (1 when a check failed)."""
    from service import reports

    summary = report["summary"]
    for check in report["thresholds"]:
        if check["status"] == "fail":
            logger.warning("breached %s: %s", check["name"], reports.check_message(check))
    not_judged = f", {summary['unknown']} not judged" if summary.get("unknown") else ""
    logger.info(
        "%s: %d checks, %d passed, %d failed%s",
        summary["status"],
        summary["checks"],
        summary["passed"],
        summary["failed"],
        not_judged,
    )
    return EXIT_BREACHED if summary["failed"] else EXIT_OK


# ----------------------------------------------------------------------------------------------- monitor


def cmd_monitor(args: argparse.Namespace) -> int:
    """A service's monitoring window as an evaluation report: its figures, and ``--fail-on`` rules checked
    client-side (drift rules against the fit-time figures of the calibrator that answered)."""
    from service import workflows
    from service.names import parse_duration

    _check_plot(args.plot)
    outputs = _outputs(args)
    parse_duration(args.window, field="--window")
    rules = [workflows.parse_monitor_rule(text) for text in args.fail_on or []]
    with _client(args) as client:
        window = client.monitoring(args.model, window=args.window, calibrator_version=args.calibrator_version)
        num_classes = client.get_model(args.model).get("num_classes")
        version = window.get("calibrator_version")
        document = client.get_calibrator(args.model, version) if version is not None else None
    report = workflows.monitoring_report(
        window,
        calibrator_document=document,
        num_classes=num_classes,
        rules=rules,
        require_outcomes=args.require_outcomes,
    )
    _write_reports(report, outputs, args.plot)
    _log_window(report)
    return _conclude(report)


def _figure(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}"


def _log_window(report: dict) -> None:
    """The window in two lines on stderr, and a warning when it has too few outcomes to be judged."""
    from service.workflows import HEADLINE_FIGURES

    monitoring, figures = report["monitoring"], report["calibrated"]
    version = monitoring["calibrator_version"]
    logger.info(
        "window %s of model %s (%s): %d outcomes; %s; server drift state %s",
        monitoring["window"],
        report.get("model"),
        f"calibrator version {version}" if version is not None else "no calibrator",
        monitoring["outcomes"],
        ", ".join(f"{name} {_figure(figures[name])}" for name in HEADLINE_FIGURES if name in figures)
        or "no figures",
        (monitoring["drift"] or {}).get("state", "?"),
    )
    label_free = monitoring["label_free"]
    logger.info(
        "label-free: %s predictions, expected accuracy %s (realised %s), confidence PSI %s, KS %s",
        label_free.get("predictions", "?"),
        _figure(label_free.get("expected_accuracy")),
        _figure(label_free.get("realised_accuracy")),
        _figure(label_free.get("confidence_psi")),
        _figure(label_free.get("confidence_ks")),
    )
    if not monitoring["judged"]:
        logger.warning(
            "too few outcomes to judge: %d in the last %s, the server judges from %s; checks not judged%s",
            monitoring["outcomes"],
            monitoring["window"],
            monitoring["min_outcomes"],
            ""
            if any(check["kind"] == "outcomes" for check in report["thresholds"])
            else " (exit 0; --require-outcomes makes it a failure)",
        )


# ------------------------------------------------------------------------------------------ serve, export


def _kserve_upstream(args: argparse.Namespace) -> str | None:
    """The upstream URL of ``--upstream`` or KServe's ``--predictor_host`` (a host[:port], no scheme): over
    HTTP for ``--protocol v2``, over gRPC for ``grpc-v2``."""
    protocol = (args.protocol or "v2").lower()
    if protocol not in ("v2", "grpc-v2"):
        raise CalibserveError(
            f"--protocol {args.protocol}: calibserve forwards the Open Inference Protocol only (v2 or grpc-v2)"
        )
    if args.predictor_host is None:
        return args.upstream
    if args.upstream is not None:
        raise CalibserveError("give --upstream or --predictor_host, not both")
    if protocol == "grpc-v2" and args.predictor_use_ssl:
        raise CalibserveError("--predictor_use_ssl: calibserve reaches a gRPC predictor without TLS only")
    host = args.predictor_host
    if "://" not in host:
        scheme = "grpc" if protocol == "grpc-v2" else "https" if args.predictor_use_ssl else "http"
        host = f"{scheme}://{host}"
    return host


def cmd_serve(args: argparse.Namespace) -> int:
    from service.config import Settings

    if args.port is not None and args.http_port is not None and args.port != args.http_port:
        raise CalibserveError("give --port or --http_port, not both")
    if args.model_name is not None:
        validate_model_name(args.model_name)
        logger.info("model %s (and any other name) is forwarded to the upstream", args.model_name)
    flags = {
        "host": args.host,
        "port": args.port if args.port is not None else args.http_port,
        "grpc_port": args.grpc_port,
        "upstream": _kserve_upstream(args),
        "upstream_timeout_s": args.predictor_request_timeout_seconds,
        "workers": args.workers,
        "models_dir": args.models_dir,
        "store_dir": args.store_dir,
        "store_url": args.store_url,
        "device": args.device,
        "log_level": args.log_level,
    }
    # Flags win over CALIBSERVE_* variables: pydantic-settings ranks init arguments above the environment.
    settings = Settings(**{name: value for name, value in flags.items() if value is not None})
    settings.check_bind_is_safe()
    from service.api.server import serve

    serve(settings)
    return EXIT_OK


def cmd_store_copy(args: argparse.Namespace) -> int:
    """Copy every model and version from one store to another (idempotent; sha256 of each document checked)."""
    from service.stores import copy_store, open_store, store_url

    source_url, target_url = store_url(args.source), store_url(args.target)
    if source_url.rstrip("/") == target_url.rstrip("/"):
        raise CommandError(f"source and destination are the same store: {source_url}")
    if source_url.startswith("file://") and not Path(args.source.removeprefix("file://")).is_dir():
        raise CommandError(f"source store {args.source} is not a directory")
    # refresh_s=0: every read goes to the store itself, never to a cached view; TorchScript files of an S3
    # store pass through a temporary directory
    with tempfile.TemporaryDirectory(prefix="calibserve-copy-") as scratch:
        source = open_store(args.source, refresh_s=0, cache_dir=Path(scratch) / "source")
        target = open_store(args.target, refresh_s=0, cache_dir=Path(scratch) / "target")
        report = copy_store(source, target)
    logger.info(
        "copied %d models: %d versions written, %d already there, %d pointers moved, %d TorchScript files",
        report.models,
        report.versions_copied,
        report.versions_present,
        report.pointers_moved,
        report.torchscript_copied,
    )
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.export(args.model, format=args.format)
    _write_bytes(args.out, data)
    logger.info("wrote %d bytes to %s", len(data), args.out)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ parser


def _add_scores(parser: argparse.ArgumentParser, *, labels: bool, inputs: bool = False) -> None:
    scores = parser.add_mutually_exclusive_group(required=True)
    scores.add_argument(
        "--logits", metavar="FILE", help="logits: .npy, .npz (FILE.npz:KEY, default key logits), .csv, .jsonl"
    )
    scores.add_argument(
        "--probabilities",
        metavar="FILE",
        help="probabilities instead of logits (rows sum to 1; one column = P(class 1) of a binary model)",
    )
    if inputs:
        scores.add_argument(
            "--inputs",
            metavar="FILE",
            help="inputs of TorchScript model --model (default .npz key inputs): run by the service with "
            "--server, else here from --models-dir",
        )
        parser.add_argument(
            "--models-dir",
            type=Path,
            default=Path("models"),
            metavar="DIR",
            help="TorchScript model repository for local --inputs (default: models)",
        )
    if labels:
        parser.add_argument(
            "--labels",
            metavar="FILE",
            help="integer labels: .npy, .npz (default key labels), .csv (one column), .jsonl (one int a line); "
            "may be left out when the scores .npz holds 'labels' or the .jsonl lines are "
            '{"logits": [...], "label": k} records',
        )


def _add_task(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        choices=("multiclass", "multilabel"),
        help="multilabel: K independent sigmoid outputs, labels a 0/1 matrix (n, K) in .npy/.npz "
        "(default multiclass; read from a multi-label --calibrator document)",
    )


def _add_client(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    group = parser.add_argument_group("client mode (run against a service)")
    group.add_argument(
        "--server", metavar="URL", required=required, help="service address, e.g. http://host:8000"
    )
    group.add_argument("--model", metavar="NAME", required=required, help="model name on the service")
    group.add_argument("--api-key", metavar="KEY", help="API key (default: $CALIBSERVE_API_KEY)")
    group.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="request timeout (default 60)"
    )


def _add_report_outputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=("json", "junit", "markdown", "html"),
        help="report format (default: from --out's extension .json/.xml/.md/.html, else json)",
    )
    parser.add_argument(
        "--out",
        action="append",
        metavar="FILE",
        help="report file (default stdout); repeat for several formats, each chosen by its extension",
    )
    parser.add_argument("--plot", metavar="FILE", help="reliability diagram, .png (600x700 px) or .svg")


def _add_evaluation(parser: argparse.ArgumentParser, *, baseline_required: bool) -> None:
    parser.add_argument("--calibrator", metavar="FILE", help="calibrator document (from calibserve fit)")
    parser.add_argument("--version", type=int, help="with --server: evaluate this calibrator version")
    parser.add_argument(
        "--bins", type=int, default=15, help=f"number of ECE bins (default 15, at most {MAX_N_BINS:,})"
    )
    parser.add_argument(
        "--binning", choices=("width", "mass"), default="width", help="equal-width or equal-mass bins"
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help=f"bootstrap resamples for 95%% intervals, bias-corrected for ece and mce (0: none; at most "
        f"{MAX_BOOTSTRAP_RESAMPLES:,}, and resamples x rows at most {MAX_BOOTSTRAP_WORK:,})",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument(
        "--ece-convention",
        choices=("calibserve", "torchmetrics", "sklearn", "netcal", "guo2017", "kumar2019"),
        help="also report ece_<NAME>: the top-label ECE as that library computes it on the same data "
        "(docs/ece-conventions.md); ece itself is unchanged",
    )
    parser.add_argument(
        "--segments",
        metavar="FILE",
        help="one segment key per row (.npy/.npz of ints or strings, a one-column .csv, .jsonl): every "
        "figure per segment, the worst segment, and gates such as 'worst.ece>0.05'",
    )
    parser.add_argument(
        "--min-segment-size",
        type=int,
        default=100,
        metavar="N",
        help="rows a segment needs to be gated and bootstrapped (default 100); smaller ones are reported only",
    )
    parser.add_argument(
        "--per-class-tests",
        action="store_true",
        help="also run the statistical calibration tests on each class's probability (report key "
        "per_class_tests: a list per figure, one value a class)",
    )
    parser.add_argument(
        "--nll-clip",
        type=float,
        metavar="EPS",
        help="report the NLL with p_y clipped to [EPS, 1 - EPS] (as sklearn's log_loss); default: the exact "
        "NLL, infinite (null in JSON, rows in nll_infinite_rows) where a true class has probability 0",
    )
    parser.add_argument(
        "--fail-on",
        action="append",
        metavar="EXPR",
        help="fail (exit 1) when a figure satisfies EXPR, e.g. 'ece>0.03', 'uncalibrated.nll>=1', "
        "'accuracy<0.9', a p-value 'spiegelhalter_p<0.01', or a bound of a bootstrap interval "
        "'ece.upper>0.03' (with --bootstrap N); calibrated figures unless prefixed; repeatable",
    )
    parser.add_argument(
        "--baseline",
        metavar="REPORT",
        required=baseline_required,
        help="an earlier JSON report (or a calibrator document: its fit-time figures) to compare against",
    )
    parser.add_argument(
        "--max-increase",
        metavar="SPEC",
        help=f"allowed increase per figure against --baseline, e.g. ece=0.01,nll=0.05 (default "
        f"{DEFAULT_MAX_INCREASE}); for accuracy, the allowed decrease",
    )
    _add_report_outputs(parser)


def _add_conformal(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--conformal", choices=("lac", "aps", "raps"), help=what)
    parser.add_argument("--alpha", type=float, help="with --conformal: the miscoverage rate (default 0.1)")
    parser.add_argument("--mondrian", action="store_true", help="with --conformal: a threshold per class")
    parser.add_argument(
        "--randomized", action="store_true", help="with --conformal: randomised aps/raps sets"
    )
    parser.add_argument(
        "--k-reg", type=int, help="with --conformal raps: the rank from which classes pay (default 1)"
    )
    parser.add_argument("--raps-lambda", type=float, help="with --conformal raps: the penalty (default 0.01)")
    parser.add_argument(
        "--conformal-fraction",
        type=float,
        help="with --conformal: share of rows held out for the threshold (default 0.5; fit: 0 uses the same rows)",
    )
    parser.add_argument("--conformal-seed", type=int, help="with --conformal: seed of the split (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Post-hoc calibration of classifier scores: fit, apply, evaluate, check drift, serve.",
        epilog="exit codes: 0 thresholds hold, 1 a threshold is breached, 2 the command failed",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no status lines on stderr")
    # -q also after the command (`calibserve fit -q ...`); SUPPRESS keeps a -q given before it
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = commands.add_parser("fit", help="fit a calibrator and write its document", parents=[quiet])
    _add_scores(fit, labels=True, inputs=True)
    fit.add_argument(
        "--method",
        choices=tuple(dict.fromkeys((*METHODS, *MULTILABEL_METHODS))),
        default="temperature",
        help="calibration method (multi-label models: temperature, shared_temperature, platt, isotonic)",
    )
    _add_task(fit)
    fit.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="method option (value read as JSON), repeatable",
    )
    fit.add_argument("--out", default="-", metavar="FILE", help="calibrator document (default stdout)")
    fit.add_argument("--no-activate", action="store_true", help="with --server: store without activating")
    _add_conformal(fit, "also fit split-conformal prediction sets with this score, stored in the document")
    _add_client(fit)
    fit.set_defaults(handler=cmd_fit)

    apply = commands.add_parser("apply", help="write calibrated probabilities", parents=[quiet])
    _add_scores(apply, labels=False)
    apply.add_argument("--calibrator", metavar="FILE", help="calibrator document (from calibserve fit)")
    apply.add_argument("--version", type=int, help="with --server: use this calibrator version")
    apply.add_argument("--out", required=True, metavar="FILE", help="probabilities: .npy, .csv or .jsonl")
    _add_task(apply)
    apply.add_argument(
        "--intervals-out",
        metavar="FILE",
        help="venn_abers calibrators: also write [p0, p1] per row and class (.npy, N x K x 2)",
    )
    apply.add_argument(
        "--sets",
        metavar="FILE",
        help="conformal prediction sets as an N x K 0/1 matrix (.npy, .csv or .jsonl), for a calibrator fitted "
        "with --conformal",
    )
    apply.add_argument(
        "--seed", type=int, help="seed of randomised prediction sets (default: fresh randomness)"
    )
    _add_client(apply)
    apply.set_defaults(handler=cmd_apply)

    evaluate = commands.add_parser(
        "evaluate", help="figures before/after calibration, thresholds, reports", parents=[quiet]
    )
    _add_scores(evaluate, labels=True, inputs=True)
    _add_evaluation(evaluate, baseline_required=False)
    _add_task(evaluate)
    _add_conformal(
        evaluate,
        "prediction sets fitted on part of the rows (--conformal-fraction), their coverage on the rest "
        "(without it, a calibrator with sets reports its own)",
    )
    _add_client(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    drift = commands.add_parser(
        "drift",
        help=f"evaluate against a baseline report (default --max-increase {DEFAULT_MAX_INCREASE})",
        parents=[quiet],
    )
    _add_scores(drift, labels=True, inputs=True)
    _add_evaluation(drift, baseline_required=True)
    _add_task(drift)
    _add_client(drift)
    drift.set_defaults(handler=cmd_evaluate)

    monitor = commands.add_parser(
        "monitor",
        help="check the calibration of a service's live outcomes (client mode only)",
        description="The calibration of the labelled outcomes of a service's rolling window (GET "
        "/v1/models/NAME/monitoring) as an evaluation report, with checks: exit 0 they hold, 1 one is "
        "breached, 2 the command failed. A window with fewer outcomes than the server judges "
        "(CALIBSERVE_MONITORING_MIN_OUTCOMES) is not judged: exit 0 unless --require-outcomes.",
        parents=[quiet],
    )
    monitor.add_argument("--window", default="24h", help="rolling window: 15m, 1h, 24h, 7d (default 24h)")
    monitor.add_argument(
        "--calibrator-version",
        type=int,
        metavar="N",
        help="the outcomes of predictions calibrator version N answered (default: the active one's)",
    )
    monitor.add_argument(
        "--fail-on",
        action="append",
        metavar="RULE",
        help="fail (exit 1) on a drift rule against the calibrator's fit-time figure, 'ece+0.02' (a rise of "
        "more than 0.02) or 'accuracy-0.05' (a fall of more than 0.05), or on a threshold, 'ece>0.05'; "
        "repeatable; default: the server's drift rules (CALIBSERVE_MONITORING_DRIFT)",
    )
    monitor.add_argument(
        "--require-outcomes",
        action="store_true",
        help="a window with too few outcomes to judge fails (exit 1) instead of passing unjudged",
    )
    _add_report_outputs(monitor)
    _add_client(monitor, required=True)
    monitor.set_defaults(handler=cmd_monitor)

    serve = commands.add_parser(
        "serve", help="run the HTTP service (flags win over CALIBSERVE_* variables)", parents=[quiet]
    )
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (default 1)")
    serve.add_argument(
        "--grpc-port",
        "--grpc_port",
        dest="grpc_port",
        type=int,
        help="also serve the Open Inference Protocol over gRPC on this port, in every worker (default off; "
        "needs the grpc extra)",
    )
    serve.add_argument("--models-dir", type=Path, metavar="DIR", help="TorchScript model repository")
    serve.add_argument(
        "--store-dir", type=Path, metavar="DIR", help="calibrator store (with --store-url s3://: local state)"
    )
    serve.add_argument(
        "--store-url", metavar="URL", help="calibrator store: s3://bucket/prefix or file:///path"
    )
    serve.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    serve.add_argument("--log-level", help="debug, info, warning, error")
    serve.add_argument(
        "--upstream",
        metavar="URL",
        help="Open Inference Protocol server (http://host:port) that serves every V2 model name calibserve "
        "does not know itself: calibrated answers in one round trip",
    )
    kserve = serve.add_argument_group(
        "KServe transformer arguments",
        "as KServe passes them to a transformer container; aliases of the above",
    )
    kserve.add_argument(
        "--predictor_host", metavar="HOST[:PORT]", help="the predictor: --upstream http://HOST[:PORT]"
    )
    kserve.add_argument("--predictor_use_ssl", action="store_true", help="https to the predictor")
    kserve.add_argument(
        "--predictor_request_timeout_seconds", type=float, metavar="S", help="CALIBSERVE_UPSTREAM_TIMEOUT_S"
    )
    kserve.add_argument(
        "--protocol",
        "--predictor_protocol",
        dest="protocol",
        help="v2 (the predictor over HTTP) or grpc-v2 (over gRPC)",
    )
    kserve.add_argument("--http_port", type=int, metavar="PORT", help="--port")
    kserve.add_argument(
        "--model_name", metavar="NAME", help="the InferenceService's model (served with every other name)"
    )
    serve.set_defaults(handler=cmd_serve)

    store = commands.add_parser("store", help="operate on calibrator stores", parents=[quiet])
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="STORE_COMMAND")
    copy = store_commands.add_parser(
        "copy",
        help="copy every model and calibrator version from SRC to DST (idempotent, sha256-checked)",
        parents=[quiet],
    )
    copy.add_argument("source", metavar="SRC_URL", help="s3://bucket/prefix, file:///path or a directory")
    copy.add_argument("target", metavar="DST_URL", help="s3://bucket/prefix, file:///path or a directory")
    copy.set_defaults(handler=cmd_store_copy)

    export = commands.add_parser(
        "export", help="download a model from a service (client mode only)", parents=[quiet]
    )
    export.add_argument("--format", default="torchscript", help="export format (default torchscript)")
    export.add_argument("--out", required=True, metavar="FILE", help="output file")
    _add_client(export, required=True)
    export.set_defaults(handler=cmd_export)
    return parser


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``calibserve`` console script and ``python -m service``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{PROG}: interrupted\n")
        return 130
    except _handled_errors() as exc:  # evaluated when an error arrives, so it sees httpx if it was imported
        sys.stderr.write(f"{PROG}: error: {_one_line(exc)}\n")
        return EXIT_FAILED
