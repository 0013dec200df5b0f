"""A real Triton Inference Server (NVIDIA PyTriton 0.7.0) serving small test models, for calibserve's tests.

Run by the separate ``.venv-triton`` interpreter (PyTriton needs numpy<2; calibserve runs numpy 2), started and
stopped by ``tests/helpers/triton.py``; it imports neither ``service`` nor ``tests``, and the tests talk to it
over HTTP only. Every model batches (the first dimension is the dynamic batch, up to 64 rows, 1024 for lookup);
the parameters W, b, w come from ``weights.json`` next to this file, which the tests read too:

- ``linear``: ``x`` FP32 [4] -> ``logits`` FP32 [3] = x @ W + b, ``norm`` FP32 [1] = sum(x)
- ``linear16``: ``x`` FP32 [4] -> ``logits`` FP16 [3] (the same map, computed in float32, rounded to float16)
- ``linear64``: ``x`` FP64 [4] -> ``logits`` FP64 [3] (the same map in float64)
- ``binary``: ``x`` FP32 [4] -> ``logits`` FP32 [1] = x @ w (one logit column: a binary classifier)
- ``lookup`` (with ``--lookup``): ``index`` INT64 [1] -> ``logits`` FP32 [K] = that row of the array
- ``multi``: ``a`` FP32 [2], ``b`` FP32 [2] -> ``logits`` FP32 [3] = concat(a, b) @ W + b,
  ``extra`` INT32 [1] = argmax of the row's logits (a second output of another dtype)
- ``slow``: ``linear`` after sleeping ``--slow-seconds`` (default 3) per call (per batch)
- ``wrong``: ``x`` FP32 [4] -> ``logits`` FP32, declared [-1], 5 columns: x @ W + b, then x[:2]
- ``nan``: ``linear`` with column 1 of ``logits`` NaN in every row
- ``identity10``, ``identity1000`` (only when ``--models`` names them; for ``bench/bench_proxy.py``): ``x`` FP32
  [10] (or [1000]) -> ``logits`` FP32 [10] (or [1000]) = x, so that a client chooses the logits it gets back

Prints ``READY`` on a line of its own once every model is loaded. On SIGINT or SIGTERM it first unloads every
model (waiting for requests in flight) so that Triton removes its stubs' shared memory and temporary folders,
then stops Triton, which waits ``--exit-timeout`` seconds (default 0) for clients' open connections. Triton and
the stubs are children of this process: a supervisor that kills them (``tests/helpers/triton.py`` kills the
whole process group after a grace period) sweeps what they leave behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

WEIGHTS = Path(__file__).with_name("weights.json")
MAX_BATCH = 64
LOOKUP_MAX_BATCH = 1024
# Bound only when --models names them: each model is a stub process of its own, and the tests do not use these.
ON_REQUEST = ("identity10", "identity1000")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument(
        "--lookup", type=Path, help="float32 logits [N, K] (.npy) that the lookup model serves"
    )
    parser.add_argument("--slow-seconds", type=float, default=3.0, help="sleep of the slow model per call")
    parser.add_argument(
        "--models",
        help=f"a comma-separated list of the models to serve (default: all but {', '.join(ON_REQUEST)})",
    )
    parser.add_argument("--exit-timeout", type=int, default=0, help="Triton's --exit-timeout-secs")
    parser.add_argument("--workspace", type=Path, help="a directory to create for PyTriton's files")
    return parser.parse_args(argv)


def bind_models(
    triton: Triton, lookup: np.ndarray | None, slow_seconds: float, only: str | None = None
) -> list[str]:
    """Bind the models (those named in ``only``, a comma-separated list, if given; without it all but those
    of :data:`ON_REQUEST`); returns their names."""
    params = json.loads(WEIGHTS.read_text())
    W64, b64 = np.array(params["W"], np.float64), np.array(params["b"], np.float64)
    W32, b32 = W64.astype(np.float32), b64.astype(np.float32)
    w32 = np.array(params["w"], np.float32)[:, None]

    def fp32(name: str, width: int) -> Tensor:
        return Tensor(name=name, dtype=np.float32, shape=(width,))

    def linear_map(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": x @ W32 + b32, "norm": x.sum(axis=1, keepdims=True, dtype=np.float32)}

    @batch
    def linear(x):
        return linear_map(x)

    @batch
    def linear16(x):
        return {"logits": (x @ W32 + b32).astype(np.float16)}

    @batch
    def linear64(x):
        return {"logits": x @ W64 + b64}

    @batch
    def binary(x):
        return {"logits": x @ w32}

    @batch
    def multi(a, b):
        # not the row's index: Triton batches concurrent requests together, the rows of each would shift
        logits = np.concatenate([a, b], axis=1) @ W32 + b32
        return {"logits": logits, "extra": logits.argmax(axis=1).astype(np.int32)[:, None]}

    @batch
    def slow(x):
        time.sleep(slow_seconds)
        return linear_map(x)

    @batch
    def wrong(x):
        return {"logits": np.concatenate([x @ W32 + b32, x[:, :2]], axis=1)}

    @batch
    def nan(x):
        outputs = linear_map(x)
        outputs["logits"][:, 1] = np.nan
        return outputs

    @batch
    def identity(x):
        return {"logits": x}

    x32, x64 = [fp32("x", 4)], [Tensor(name="x", dtype=np.float64, shape=(4,))]
    logits_norm = [fp32("logits", 3), fp32("norm", 1)]
    models = {
        "linear": (linear, x32, logits_norm),
        "linear16": (linear16, x32, [Tensor(name="logits", dtype=np.float16, shape=(3,))]),
        "linear64": (linear64, x64, [Tensor(name="logits", dtype=np.float64, shape=(3,))]),
        "binary": (binary, x32, [fp32("logits", 1)]),
        "multi": (
            multi,
            [fp32("a", 2), fp32("b", 2)],
            [fp32("logits", 3), Tensor(name="extra", dtype=np.int32, shape=(1,))],
        ),
        "slow": (slow, x32, logits_norm),
        # PyTriton checks outputs against the declaration only with strict=True (not set) and Triton does not
        # check a Python model's output shapes (declared [3], 5 columns come through as well, with metadata
        # [-1, 3]): [-1] keeps the metadata honest, so that only the answer tells the class count.
        "wrong": (wrong, x32, [fp32("logits", -1)]),
        "nan": (nan, x32, logits_norm),
        "identity10": (identity, [fp32("x", 10)], [fp32("logits", 10)]),
        "identity1000": (identity, [fp32("x", 1000)], [fp32("logits", 1000)]),
    }
    if lookup is not None:
        table = np.ascontiguousarray(lookup, dtype=np.float32)

        @batch
        def lookup_rows(index):
            return {"logits": table[index[:, 0]]}

        index = [Tensor(name="index", dtype=np.int64, shape=(1,))]
        models["lookup"] = (lookup_rows, index, [fp32("logits", table.shape[1])])

    names = [name for name in models if name not in ON_REQUEST] if only is None else only.split(",")
    unknown = sorted(set(names) - set(models))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown} (lookup needs --lookup); known: {sorted(models)}")
    for name in names:
        function, inputs, outputs = models[name]
        config = ModelConfig(max_batch_size=LOOKUP_MAX_BATCH if name == "lookup" else MAX_BATCH)
        triton.bind(model_name=name, infer_func=function, inputs=inputs, outputs=outputs, config=config)
    return names


def descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (Triton and the Python backend's stub of each loaded model)."""
    found, index = [pid], 0
    while index < len(found):
        parent, index = found[index], index + 1
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found[1:]


def stub_count() -> int:
    count = 0
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            count += b"triton_python_backend_stub" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return count


def unload_models(triton: Triton, http_port: int, names: list[str], timeout: float) -> None:
    """Ask Triton to unload every model and wait (at most ``timeout`` seconds) until their stubs have exited:
    Triton then has removed what it made for them (the stubs' shared memory, a temporary folder each), which
    it skips when it stops with models still loaded. An unload waits for the model's requests in flight."""
    headers = {"triton-access-token": triton.get_access_token()}
    for name in names:
        url = f"http://127.0.0.1:{http_port}/v2/repository/models/{name}/unload"
        with contextlib.suppress(OSError):
            urllib.request.urlopen(
                urllib.request.Request(url, b"", headers, method="POST"), timeout=5
            ).close()
    deadline = time.monotonic() + timeout
    while stub_count() and time.monotonic() < deadline:
        time.sleep(0.05)


STOPPING: list[int] = []


def _request_stop(signum, frame) -> None:
    STOPPING.append(signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parent = os.getppid()
    # The Python backend's stub links libpython3.11 dynamically: without this it may find the system's copy
    # instead of this interpreter's and fail ("'_thread.RLock' object has no attribute '_recursion_count'").
    # Triton and its stubs inherit this environment.
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
    lookup = None
    if args.lookup is not None:
        lookup = np.load(args.lookup)
        if lookup.ndim != 2:
            raise SystemExit(f"--lookup: a [N, K] array expected, got shape {lookup.shape}")
    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        exit_timeout_secs=args.exit_timeout,
    )
    triton = Triton(config=config, workspace=args.workspace)
    try:
        names = bind_models(triton, lookup, args.slow_seconds, args.models)
        triton.run()
        print("READY", flush=True)
        # not triton.serve(): it stops Triton on SIGINT before the models could be unloaded. A parent that dies
        # (a test run killed) is a request to stop too.
        while not STOPPING and triton.is_alive() and os.getppid() == parent:
            time.sleep(0.1)
        if os.getppid() != parent:
            STOPPING.append(signal.SIGHUP)
        if not STOPPING:
            print("tritonserver exited", file=sys.stderr, flush=True)
            return 1
        unload_models(triton, args.http_port, names, timeout=args.slow_seconds + 5)
    finally:
        triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
