"""Readers and writers of the array files the CLI takes: ``.npy``, ``.npz``, ``.csv`` and ``.jsonl``.

Formats
-------
``.npy``
    One array, read with ``numpy.load(allow_pickle=False)`` (object arrays are refused, never unpickled).
``.npz``
    ``FILE.npz:KEY`` picks the array ``KEY``; without ``:KEY`` the default key is used: ``logits`` or
    ``probabilities`` for scores (as the caller's flag says) and ``labels`` for labels. An archive holding a
    single array needs no key.
``.csv``
    Comma-separated numbers, one row per sample. A first row holding anything that is not a number is a
    header and is skipped. A labels file has one column.
``.jsonl``
    One JSON value per line (blank lines are skipped). For scores, each line is an array of numbers; for
    labels, each line is an integer. A line may also be an object ``{"logits": [...], "label": k}`` (or
    ``"probabilities"`` instead of ``"logits"``): one file then holds both scores and labels.

Whether scores are logits or probabilities is stated by the caller, never guessed from the values. These
readers only parse: shapes, NaN and label ranges are checked by :mod:`service.core.validation`, whose
messages name the offending row.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidInput

SCORE_KINDS = ("logits", "probabilities", "inputs")  # inputs: what a TorchScript model takes
LABELS_KEY = "labels"
READ_SUFFIXES = (".npy", ".npz", ".csv", ".jsonl")
WRITE_SUFFIXES = (".npy", ".csv", ".jsonl")

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` (bytes) while a text file is parsed."""


def split_spec(spec: str | Path) -> tuple[Path, str | None]:
    """``"runs/out.npz:logits_val"`` -> ``(Path("runs/out.npz"), "logits_val")``; other paths keep no key.

    Only a ``:KEY`` after a ``.npz`` name is a key, so that paths holding a colon elsewhere still work.
    """
    text = str(spec)
    head, sep, key = text.rpartition(":")
    if sep and head.lower().endswith(".npz") and key and "/" not in key and "\\" not in key:
        return Path(head), key
    return Path(text), None


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in READ_SUFFIXES:
        raise InvalidInput(
            f"{path}: unsupported file type {suffix or '(none)'!r}; use one of {', '.join(READ_SUFFIXES)}",
            field="path",
        )
    return suffix


def _load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:  # pickled object arrays, truncated or malformed headers
        raise InvalidInput(f"{path}: not a readable .npy array ({exc})", field="path") from None
    if not isinstance(array, np.ndarray):
        raise InvalidInput(f"{path}: expected one array in a .npy file", field="path")
    return array


def _load_npz(path: Path, key: str | None, default_key: str) -> np.ndarray:
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, zipfile.BadZipFile) as exc:
        raise InvalidInput(f"{path}: not a readable .npz archive ({exc})", field="path") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InvalidInput(f"{path}: not an .npz archive", field="path")
    with archive:
        keys = list(archive.files)
        wanted = key or default_key
        if wanted not in keys:
            if key is None and len(keys) == 1:
                wanted = keys[0]
            else:
                hint = f"; pick one with {path}:KEY" if key is None else ""
                raise InvalidInput(
                    f"{path} has no array {wanted!r} (it has: {', '.join(keys) or 'none'}){hint}",
                    field="path",
                )
        try:
            return archive[wanted]
        except ValueError as exc:
            raise InvalidInput(f"{path}:{wanted}: not a readable array ({exc})", field="path") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(path: Path, progress: Progress | None) -> np.ndarray:
    total = path.stat().st_size
    rows: list[list[float]] = []
    done = 0
    with path.open(newline="", encoding="utf-8") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            done += sum(len(cell) + 1 for cell in row)
            if progress is not None and line_number % 65536 == 0:
                progress(min(done, total), total)
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue
            if not rows and line_number == 1 and not all(_is_number(cell) for cell in cells):
                continue  # a header row
            try:
                rows.append([float(cell) for cell in cells])
            except ValueError:
                bad = next(cell for cell in cells if not _is_number(cell))
                raise InvalidInput(
                    f"{path} line {line_number}: {bad!r} is not a number", field="path"
                ) from None
    if progress is not None:
        progress(total, total)
    if not rows:
        raise InvalidInput(f"{path} holds no rows", field="path")
    widths = {len(row) for row in rows}
    if len(widths) != 1:
        line = next(i for i, row in enumerate(rows) if len(row) != len(rows[0]))
        raise InvalidInput(
            f"{path}: row {line} has {len(rows[line])} columns but row 0 has {len(rows[0])}", field="path"
        )
    return np.asarray(rows, dtype=np.float64)


def _read_jsonl(path: Path, progress: Progress | None) -> list[Any]:
    total = path.stat().st_size
    values = []
    done = 0
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            done += len(line)
            if progress is not None and line_number % 65536 == 0:
                progress(done, total)
            if not line.strip():
                continue
            try:
                values.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                raise InvalidInput(
                    f"{path} line {line_number}: not valid JSON ({exc})", field="path"
                ) from None
    if progress is not None:
        progress(total, total)
    if not values:
        raise InvalidInput(f"{path} holds no lines", field="path")
    return values


def _jsonl_scores(path: Path, values: list[Any], kind: str) -> np.ndarray:
    if isinstance(values[0], dict):
        try:
            values = [value[kind] for value in values]
        except (KeyError, TypeError):
            line = next(i for i, v in enumerate(values) if not isinstance(v, dict) or kind not in v)
            raise InvalidInput(
                f"{path}: record {line} has no {kind!r} field (records look like "
                f'{{"{kind}": [...], "label": k}})',
                field=kind,
            ) from None
    try:
        return np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        widths = {len(v) if isinstance(v, list) else -1 for v in values}
        raise InvalidInput(
            f"{path}: every line must be an array of numbers of one length (saw lengths {sorted(widths)})",
            field=kind,
        ) from None


def _jsonl_labels(path: Path, values: list[Any]) -> np.ndarray:
    if isinstance(values[0], dict):
        try:
            values = [value["label"] for value in values]
        except (KeyError, TypeError):
            line = next(i for i, v in enumerate(values) if not isinstance(v, dict) or "label" not in v)
            raise InvalidInput(f"{path}: record {line} has no 'label' field", field="labels") from None
    try:
        array = np.asarray(values)
    except ValueError:  # ragged lines
        array = np.asarray(values, dtype=object)
    if array.ndim != 1 or array.dtype.kind not in "iufb":
        raise InvalidInput(f"{path}: each line must hold one integer label", field="labels")
    return array


def read_scores(spec: str | Path, *, kind: str = "logits", progress: Progress | None = None) -> np.ndarray:
    """Read a score matrix (logits or probabilities, as ``kind`` says) from ``spec``.

    Parameters
    ----------
    spec : str or Path
        A file path, or ``FILE.npz:KEY``.
    kind : {"logits", "probabilities", "inputs"}
        What the file holds; it selects the default ``.npz`` key and the ``.jsonl`` record field.
    progress : callable, optional
        ``progress(done_bytes, total_bytes)`` while a text file is parsed.

    Returns
    -------
    numpy.ndarray
        The array as stored (``.npy``/``.npz`` keep their dtype; text files give float64).
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"kind must be one of {SCORE_KINDS}, got {kind!r}")
    path, key = split_spec(spec)
    suffix = _suffix(path)
    if suffix == ".npy":
        return _load_npy(path)
    if suffix == ".npz":
        return _load_npz(path, key, kind)
    if suffix == ".csv":
        return _read_csv(path, progress)
    return _jsonl_scores(path, _read_jsonl(path, progress), kind)


def read_labels(spec: str | Path, *, progress: Progress | None = None) -> np.ndarray:
    """Read class labels (one per sample) from ``spec``; a one-column CSV or 2-D ``(n, 1)`` array is flattened."""
    path, key = split_spec(spec)
    suffix = _suffix(path)
    if suffix == ".npy":
        array = _load_npy(path)
    elif suffix == ".npz":
        array = _load_npz(path, key, LABELS_KEY)
    elif suffix == ".csv":
        array = _read_csv(path, progress)
        if array.shape[1] != 1:
            raise InvalidInput(
                f"{path}: a labels CSV has one column, this one has {array.shape[1]}", field="labels"
            )
    else:
        return _jsonl_labels(path, _read_jsonl(path, progress))
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    return array


def read_segments(spec: str | Path, *, progress: Progress | None = None) -> list[Any]:
    """Read one segment key (a string or an integer) per sample from ``spec``: ``.npy``/``.npz`` arrays of
    integers or strings, a one-column ``.csv`` (each cell a key as written: ``007`` stays ``"007"``), or
    ``.jsonl`` (one JSON string or integer a line)."""
    path, key = split_spec(spec)
    suffix = _suffix(path)
    if suffix in (".npy", ".npz"):
        array = _load_npy(path) if suffix == ".npy" else _load_npz(path, key, "segments")
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 1 or array.dtype.kind not in "iuU":
            raise InvalidInput(
                f"{path}: segments are a 1-D array of integers or strings, got {array.dtype} {array.shape}",
                field="segments",
            )
        return array.tolist()
    if suffix == ".jsonl":
        return _read_jsonl(path, progress)
    text = path.read_text(encoding="utf-8")
    cells = [line.strip() for line in text.splitlines() if line.strip()]
    if any("," in cell for cell in cells):
        raise InvalidInput(f"{path}: a segments CSV has one column", field="segments")
    return cells


def labels_spec_from_scores(spec: str | Path) -> str | None:
    """Where labels live when no labels file is given: the same ``.npz`` (key ``labels``) or ``.jsonl`` records.

    Returns ``None`` when the scores file cannot hold labels.
    """
    path, key = split_spec(spec)
    suffix = path.suffix.lower()
    if suffix == ".npz" and key is None:
        return f"{path}:{LABELS_KEY}"
    if suffix == ".jsonl":
        return str(path)
    return None


def write_array(path: str | Path, array: np.ndarray) -> None:
    """Write a 2-D array as ``.npy``, ``.csv`` (no header, full float precision) or ``.jsonl`` (one row a line)."""
    target = Path(path)
    suffix = target.suffix.lower()
    array = np.asarray(array)
    if suffix == ".npy":
        # np.save appends .npy to names lacking it; write through a handle so the name is exactly the one given
        with target.open("wb") as handle:
            np.save(handle, array, allow_pickle=False)
    elif suffix == ".csv":
        buffer = io.StringIO()
        np.savetxt(buffer, np.atleast_2d(array), delimiter=",", fmt="%.17g")
        target.write_text(buffer.getvalue(), encoding="utf-8")
    elif suffix == ".jsonl":
        rows = np.ascontiguousarray(np.atleast_2d(array), dtype=np.float64)
        with target.open("wb") as handle:
            for row in rows:
                handle.write(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    else:
        raise InvalidInput(
            f"{target}: unsupported output type {suffix or '(none)'!r}; use one of {', '.join(WRITE_SUFFIXES)}",
            field="out",
        )
