# calibserve: CPU torch by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (or another CUDA wheel index) for a GPU image.
FROM python:3.11-slim AS base

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

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
RUN pip install --no-deps --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
# The same lock as `make install` (refreshed by `make lock`): every dependency at the version the tests ran.
COPY requirements.lock pyproject.toml README.md ./
COPY service ./service
RUN pip install -c requirements.lock .
COPY models ./models

RUN mkdir -p /data && chown calibserve:calibserve /data
VOLUME ["/data"]
USER calibserve
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]

ENTRYPOINT ["calibserve", "serve"]
