# calibserve: CPU torch by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (or another CUDA wheel index) for a GPU image.
# --build-arg WITH_TORCH=0 builds an image without torch, for logits-only and proxy use (a KServe transformer in
# front of Triton: deploy/kserve/). calibserve imports torch only when a TorchScript model, an export or a
# torch-backed fit needs it, so such an image serves none of those: fit with torch elsewhere
# (`calibserve fit --out`) and upload the calibrator document. Default WITH_TORCH=1: torch as below.
FROM python:3.11-slim AS base

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# 1: torch installed (the default); 0: no torch (see the top of this file). Anything else stops the build.
ARG WITH_TORCH=1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CALIBSERVE_HOST=0.0.0.0 \
    CALIBSERVE_PORT=8000 \
    CALIBSERVE_MODELS_DIR=/app/models \
    CALIBSERVE_STORE_DIR=/data

RUN groupadd --system --gid 10001 calibserve \
    && useradd --system --uid 10001 --gid calibserve --home-dir /app --shell /usr/sbin/nologin calibserve

WORKDIR /app
# torch alone from its index (CPU or CUDA build; --no-deps: its dependencies come from PyPI below, at the
# locked versions). requirements.lock pins torch without a local label, so 2.13.0+cpu or +cu128 both match.
RUN if [ "$WITH_TORCH" = "1" ]; then \
        pip install --no-deps --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"; \
    elif [ "$WITH_TORCH" != "0" ]; then \
        echo "WITH_TORCH must be 1 or 0, not '${WITH_TORCH}'" >&2; exit 1; \
    fi
# The same lock as `make install` (refreshed by `make lock`): every dependency at the version the tests ran.
# Both ways install the `postgres` extra (psycopg 3), so the image can use CALIBSERVE_DATABASE_URL=postgresql://...,
# and the `s3` extra (boto3), so it can use CALIBSERVE_STORE_URL=s3://bucket/prefix, and the `grpc` extra
# (grpcio, Triton's stubs), so it can serve CALIBSERVE_GRPC_PORT and reach grpc:// upstreams.
# WITH_TORCH=0: pyproject's runtime dependencies and those extras' but torch, then the project itself with
# --no-deps (a plain `pip install .` would fetch torch, the multi-GB CUDA build, from PyPI for its torch requirement).
COPY requirements.lock pyproject.toml README.md ./
COPY service ./service
RUN if [ "$WITH_TORCH" = "1" ]; then \
        pip install -c requirements.lock ".[postgres,s3,grpc]"; \
    else \
        python -c 'import re, tomllib; project = tomllib.load(open("pyproject.toml", "rb"))["project"]; deps = project["dependencies"] + project["optional-dependencies"]["postgres"] + project["optional-dependencies"]["s3"] + project["optional-dependencies"]["grpc"]; print("\n".join(d for d in deps if re.match(r"[A-Za-z0-9._-]+", d).group().lower() != "torch"))' > /tmp/requirements-no-torch.txt \
        && pip install -c requirements.lock -r /tmp/requirements-no-torch.txt \
        && pip install -c requirements.lock --no-deps . \
        && rm /tmp/requirements-no-torch.txt; \
    fi
COPY models ./models

RUN mkdir -p /data && chown calibserve:calibserve /data
VOLUME ["/data"]
USER calibserve
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]

ENTRYPOINT ["calibserve", "serve"]
