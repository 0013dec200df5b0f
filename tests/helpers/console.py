"""What the console's tests share besides their fixtures: the keys, a hostile name, the running setup."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.helpers.servers import Server

ADMIN_KEY = "console-admin-key"
READ_KEY = "console-read-key"
HOSTILE = "<img src=x onerror=alert(1)>"


@dataclass
class Console:
    server: Server
    data: Path  # an .npz of labelled logits (CIFAR-10 LeNet-5 test logits), for diagrams and fits
    bad_document: Path  # a calibrator document the service refuses
    logits_npy: Path  # the same logits as float32 .npy, and their labels as a .csv with a header
    labels_csv: Path
    logits: np.ndarray
    labels: np.ndarray
    fit_logits: np.ndarray  # what versions 1 and 2 of cifar were fitted on (their stored diagrams' data)
    fit_labels: np.ndarray

    def api(self, key: str = ADMIN_KEY):
        return self.server.client(headers={"X-API-Key": key})
