"""Plain helpers shared by the tests (functions, classes, constants): imported, never collected.

Fixtures stay in the ``conftest.py`` files; no test imports a conftest. Modules: ``data`` (paths, the arrays
under tests/data and models/), ``numerics`` (float32-aware comparisons, reference softmax), ``problems``
(problem+json assertions), ``torchscript`` (scripted modules, faulty ones included), ``images`` (PNG),
``servers`` (real ``calibserve serve`` processes on free ports), ``rawhttp`` (byte-exact HTTP/1.1),
``processes`` and ``stores`` (what the reliability tests inspect), ``figures`` (measured figures report),
``requirements`` (skip here, fail in CI: ``require_or_skip``), ``triton`` (a real Triton Inference Server),
``manifests`` (Kubernetes manifests: YAML, vendored CRDs judged strictly, the image's Dockerfile facts).
"""
