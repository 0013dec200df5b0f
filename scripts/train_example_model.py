"""Train the example TorchScript model shipped in ``models/digits-mlp``.

A small MLP (64 -> 64 -> 10, ReLU) on scikit-learn's 8x8 digits (``sklearn.datasets.load_digits``, bundled with
scikit-learn: no network). The model takes the raw pixel values (0..16) as 64 floats and scales them by 1/16
itself, so that a client sends exactly what ``load_digits`` gives.

The training loss is one practitioners use on imbalanced data: class-weighted cross-entropy with "balanced"
weights ``w_k = n / (K n_k)`` (as ``sklearn.utils.class_weight.compute_class_weight``) mixed with a macro
soft-F1 loss,

.. math::

    L = 0.7 \\, \\mathrm{CE}_w + 0.3 \\left(1 - \\frac{1}{K} \\sum_k
        \\frac{2 \\, TP_k}{2 \\, TP_k + FP_k + FN_k + \\epsilon}\\right),

where ``TP_k = sum_i p_ik y_ik``, ``FP_k = sum_i p_ik (1 - y_ik)``, ``FN_k = sum_i (1 - p_ik) y_ik`` are computed
from the softmax probabilities of a mini-batch. The model is trained for a fixed, generous number of epochs
without weight decay: it fits the training split almost perfectly and its logits grow, so it comes out
over-confident on held-out data, which is what the calibration walkthrough needs to show.

Splits (stratified, ``random_state=0``): train 60 %, validation 20 % (for fitting a calibrator), test 20 %
(for judging it). Outputs in ``--out``: ``model.pt`` (TorchScript), ``model.json`` (metadata),
``validation.npz`` and ``test.npz`` (keys ``inputs`` float32 N x 64, ``labels`` int64, ``logits`` float32 N x 10:
the logits of the exported model, re-loaded from ``model.pt`` on CPU).

Usage::

    python scripts/train_example_model.py --out models/digits-mlp
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

logger = logging.getLogger("train_example_model")

NUM_CLASSES = 10
N_FEATURES = 64
PIXEL_MAX = 16.0
CE_WEIGHT = 0.7
SOFT_F1_WEIGHT = 0.3
SOFT_F1_EPS = 1e-7
N_ECE_BINS = 15


class DigitsMLP(nn.Module):
    """64 raw pixel values (0..16) -> 10 digit logits."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.hidden = nn.Linear(N_FEATURES, hidden)
        self.output = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling lives inside the model so that callers send load_digits' pixel values unchanged.
        x = x / 16.0
        return self.output(torch.relu(self.hidden(x)))


def soft_f1_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``1 - macro soft-F1`` from softmax probabilities (differentiable surrogate of macro F1)."""
    probabilities = torch.softmax(logits, dim=1)
    one_hot = F.one_hot(targets, NUM_CLASSES).to(probabilities.dtype)
    true_positive = (probabilities * one_hot).sum(dim=0)
    false_positive = (probabilities * (1.0 - one_hot)).sum(dim=0)
    false_negative = ((1.0 - probabilities) * one_hot).sum(dim=0)
    soft_f1 = 2.0 * true_positive / (2.0 * true_positive + false_positive + false_negative + SOFT_F1_EPS)
    return 1.0 - soft_f1.mean()


def training_loss(logits: torch.Tensor, targets: torch.Tensor, class_weight: torch.Tensor) -> torch.Tensor:
    """``0.7 * class-weighted CE + 0.3 * (1 - soft-F1)``."""
    weighted_ce = F.cross_entropy(logits, targets, weight=class_weight)
    return CE_WEIGHT * weighted_ce + SOFT_F1_WEIGHT * soft_f1_loss(logits, targets)


def split_digits(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified 60 / 20 / 20 split of the digits data set; inputs float32 (raw 0..16), labels int64."""
    digits = load_digits()
    inputs = digits.data.astype(np.float32)
    labels = digits.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        inputs, labels, test_size=0.2, stratify=labels, random_state=seed
    )
    # 0.25 of the remaining 80 % is 20 % of the whole.
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=0.25, stratify=y_rest, random_state=seed
    )
    return {"train": (x_train, y_train), "validation": (x_val, y_val), "test": (x_test, y_test)}


def top_label_ece(logits: np.ndarray, labels: np.ndarray, n_bins: int = N_ECE_BINS) -> float:
    """Top-label ECE, equal-width bins ``(i/M, (i+1)/M]``, L1 (the service's default convention)."""
    probabilities = np.exp(log_softmax(logits.astype(np.float64), axis=1))
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.bincount(bins, weights=correct - confidence, minlength=n_bins)
    return float(np.abs(gap).sum() / count.sum())


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(z / T)``."""
    log_p = log_softmax(logits.astype(np.float64) / temperature, axis=1)
    return float(-log_p[np.arange(labels.shape[0]), labels].mean())


def best_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising the NLL (convex in 1/T, so a bounded 1-D search on log T is exact enough)."""
    result = minimize_scalar(
        lambda log_t: nll(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
        options={"xatol": 1e-8},
    )
    return float(np.exp(result.x))


def train(
    x_train: np.ndarray, y_train: np.ndarray, *, seed: int, epochs: int, batch_size: int, learning_rate: float
) -> DigitsMLP:
    torch.manual_seed(seed)
    model = DigitsMLP()
    class_weight = torch.tensor(
        compute_class_weight("balanced", classes=np.arange(NUM_CLASSES), y=y_train), dtype=torch.float32
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=0.0)
    inputs = torch.from_numpy(x_train)
    targets = torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=generator)
        total = 0.0
        for start in range(0, inputs.shape[0], batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = training_loss(model(inputs[batch]), targets[batch], class_weight)
            loss.backward()
            optimizer.step()
            total += float(loss) * batch.shape[0]
        if (epoch + 1) % 50 == 0:
            logger.info("epoch %d: mean training loss %.5f", epoch + 1, total / inputs.shape[0])
    return model.eval()


def exported_logits(module: torch.jit.ScriptModule, inputs: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(inputs)).numpy().astype(np.float32)


def figures(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, confidence, ECE and NLL before and after the split's own best temperature."""
    temperature = best_temperature(logits, labels)
    return {
        "n": int(labels.shape[0]),
        "accuracy": float((logits.argmax(axis=1) == labels).mean()),
        "mean_confidence": float(np.exp(log_softmax(logits.astype(np.float64), axis=1)).max(axis=1).mean()),
        "ece": top_label_ece(logits, labels),
        "nll": nll(logits, labels),
        "nll_at_best_temperature": nll(logits, labels, temperature),
        "best_temperature": temperature,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/digits-mlp"), help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    # One thread and deterministic kernels: the same command gives the same weights on the same platform.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    splits = split_digits(args.seed)
    x_train, y_train = splits["train"]
    model = train(
        x_train,
        y_train,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
    )

    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / "model.pt"
    torch.jit.script(model).save(str(model_path))
    # Logits come from the file as saved and re-loaded, so the stored arrays are what a server would compute.
    exported = torch.jit.load(str(model_path), map_location="cpu").eval()

    report: dict[str, dict[str, float]] = {}
    for split_name in ("validation", "test"):
        inputs, labels = splits[split_name]
        logits = exported_logits(exported, inputs)
        np.savez_compressed(args.out / f"{split_name}.npz", inputs=inputs, labels=labels, logits=logits)
        report[split_name] = figures(logits, labels)
    report["train"] = {
        "accuracy": float((exported_logits(exported, x_train).argmax(axis=1) == y_train).mean())
    }
    # The walkthrough's question: does the temperature fitted on validation help on unseen test data?
    test_inputs, test_labels = splits["test"]
    test_logits = exported_logits(exported, test_inputs)
    validation_temperature = report["validation"]["best_temperature"]
    report["test"]["nll_at_validation_temperature"] = nll(test_logits, test_labels, validation_temperature)
    report["test"]["ece_at_validation_temperature"] = top_label_ece(
        test_logits / validation_temperature, test_labels
    )

    metadata = {
        "description": (
            "Example classifier: MLP 64 -> 64 -> 10 (ReLU) on scikit-learn's 8x8 digits. Input: the 64 raw "
            "pixel values (0..16, float32, row-major); the model divides by 16 itself. Output: 10 logits. "
            "Deliberately over-confident (long training, no weight decay): fit a temperature on "
            "validation.npz."
        ),
        "num_classes": NUM_CLASSES,
        "class_names": [str(k) for k in range(NUM_CLASSES)],
        "input_shape": [N_FEATURES],
        "input_dtype": "float32",
        "training": {
            "script": "scripts/train_example_model.py",
            "command": f"python scripts/train_example_model.py --out {args.out.as_posix()}",
            "dataset": "sklearn.datasets.load_digits (1797 images)",
            "split": "stratified train 60 % / validation 20 % / test 20 %, train_test_split(random_state=seed)",
            "loss": (
                f"{CE_WEIGHT} * class-weighted cross-entropy ('balanced' weights) + "
                f"{SOFT_F1_WEIGHT} * (1 - macro soft-F1)"
            ),
            "optimizer": f"Adam(lr={args.learning_rate:g}, weight_decay=0)",
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "seed": args.seed,
            "torch_version": torch.__version__.split("+")[0],
            "train_accuracy": round(report["train"]["accuracy"], 6),
            "test_accuracy": round(report["test"]["accuracy"], 6),
            "validation": {key: round(value, 6) for key, value in report["validation"].items()},
            "test": {key: round(value, 6) for key, value in report["test"].items()},
            "ece_convention": "top-label, 15 equal-width bins (i/M, (i+1)/M], L1",
        },
    }
    (args.out / "model.json").write_text(json.dumps(metadata, indent=2) + "\n")
    for split_name, values in report.items():
        logger.info("%s: %s", split_name, json.dumps(values))
    logger.info("wrote %s (%d bytes)", model_path, model_path.stat().st_size)


if __name__ == "__main__":
    main()
