"""Settings of the service, read from ``CALIBSERVE_*`` environment variables (pydantic-settings).

Nothing reads settings at import time: ``create_app(settings)`` takes them as an argument, and
``get_settings()`` (cached) is only called by the entry points (CLI ``serve`` and the uvicorn factory).
"""

from __future__ import annotations

import hmac
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Role = Literal["read", "admin"]
ROLES: tuple[str, ...] = ("read", "admin")
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class Settings(BaseSettings):
    """Every option of ``calibserve serve``; each is also ``CALIBSERVE_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="CALIBSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    models_dir: Path | None = Path("models")
    store_dir: Path = Field(
        Path("data"),
        description="the calibrator store directory; with store_url=s3://..., the local state directory "
        "(cache of uploaded TorchScript files and the default monitoring SQLite database)",
    )
    store_url: str | None = Field(
        None,
        description="calibrator store as a URL: s3://bucket/prefix (endpoint and credentials from the "
        "standard AWS environment, AWS_ENDPOINT_URL, ...) or file:///path; default: store_dir",
    )
    store_refresh_s: float = Field(
        1.0,
        ge=0.0,
        le=3600.0,
        description="S3 store: longest time a replica serves a model's cached metadata and active pointer "
        "(the staleness bound across replicas)",
    )
    device: str = "auto"
    api_keys: str = Field("", description='comma-separated "key:role" pairs, role read or admin')
    auth: Literal["auto", "on", "off"] = "auto"
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_concurrency: int = Field(1024, ge=1)
    # Connection guards (service/api/connections.py, which says why these defaults).
    max_connections: int = Field(
        1024, ge=1, description="open connections per worker; beyond it a new one gets 503 and is closed"
    )
    header_timeout_s: float = Field(
        10.0, gt=0.0, le=3600.0, description="seconds a request's line and headers may take to arrive (408)"
    )
    max_header_bytes: int = Field(
        32 * 1024, ge=1024, le=16 * 1024 * 1024, description="bytes of request line and headers (431)"
    )
    body_min_rate: int = Field(
        1024, ge=0, description="bytes/s a request body must average after the grace period (408; 0: off)"
    )
    body_grace_s: float = Field(
        10.0, ge=0.0, le=3600.0, description="seconds a body may arrive at any pace before the rate counts"
    )
    cors_origins: str = Field(
        "",
        description="comma-separated browser origins allowed to call (and write to) the service; '*' for "
        "any; empty: CORS off and cross-origin writes refused",
    )
    batch_max_size: int = Field(
        0, ge=0, le=1_000_000, description="dynamic batching of /predict: rows per batch (0: off)"
    )
    batch_max_delay_ms: float = Field(
        2.0, ge=0.0, le=1000.0, description="dynamic batching: longest wait of a batch's first request"
    )
    max_work_seconds: float | None = Field(
        120.0, gt=0, description="longest fit, evaluation or figures computation; then 504 (None: no limit)"
    )
    model_timeout_s: float = Field(
        10.0,
        gt=0.0,
        le=3600.0,
        description="longest a TorchScript forward pass (or an upload's smoke check) may run; "
        "past it the request answers 504 and the model is marked stalled",
    )
    grpc_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="port of the Open Inference Protocol over gRPC, served by every worker on the same host "
        "(None: off; needs the grpc extra)",
    )
    upstream: str | None = Field(
        None,
        description="Open Inference Protocol server (http://host:port) that serves every V2 model name "
        "calibserve does not know itself (transparent proxy); KServe's --predictor_host",
    )
    upstream_connect_timeout_s: float = Field(
        2.0, gt=0.0, le=600.0, description="seconds to connect to an upstream server (then 504)"
    )
    upstream_timeout_s: float = Field(
        30.0, gt=0.0, le=3600.0, description="seconds an upstream call may take in all (then 504)"
    )
    upstream_max_connections: int = Field(
        100, ge=1, le=10_000, description="pooled keep-alive connections per upstream server and worker"
    )
    upstream_batch_size: int = Field(
        256, ge=1, le=1_000_000, description="rows per upstream call when fitting or evaluating on inputs"
    )
    upstream_share_calls: bool = Field(
        True,
        description="concurrent inference requests of an upstream model that takes batches (its server states "
        "a max_batch_size) share one upstream call while another is in flight",
    )
    prediction_log: Literal["on", "off"] = Field(
        "off", description="log every calibrated row (ids in the answers) for outcomes and monitoring"
    )
    prediction_log_models: str = Field(
        "", description="comma-separated models whose predictions are logged even with prediction_log off"
    )
    prediction_log_max_age: str = Field(
        "8d", description="how long logged predictions, outcomes and bins are kept (e.g. 8d, 36h)"
    )
    prediction_log_max_rows: int = Field(10_000_000, ge=1, description="most logged predictions kept")
    database_url: str | None = Field(
        None,
        description="monitoring database: postgresql://... for replicas on several hosts; "
        "default SQLite in the store directory (monitoring.sqlite3)",
    )
    monitoring_windows: str = Field("1h,24h", description="windows exported on /metrics (e.g. 15m,1h,24h,7d)")
    monitoring_min_outcomes: int = Field(
        100, ge=1, description="outcomes a window needs before it is judged (else too_few_outcomes)"
    )
    monitoring_drift: str = Field(
        "ece+0.02", description="drift rules against the fit-time figures, comma-separated (e.g. ece+0.02)"
    )
    max_outcomes_per_request: int = Field(
        100_000, ge=1, le=10_000_000, description="rows of one outcomes call"
    )
    metrics_model_latency: str = Field(
        "", description="comma-separated models that get a latency histogram of their own on /metrics"
    )
    log_level: str = "info"

    @field_validator("upstream")
    @classmethod
    def _upstream_url(cls, value: str | None) -> str | None:
        from service.names import normalise_url

        return None if not value else normalise_url(value)

    @field_validator("store_url")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("s3://", "file://")):
            raise ValueError("store_url must be s3://bucket/prefix or file:///path")
        return value

    @property
    def store_location(self) -> str | Path:
        """Where the calibrator store is: store_url when set, else store_dir."""
        return self.store_url or self.store_dir

    @field_validator("api_keys")
    @classmethod
    def _keys_parse(cls, value: str) -> str:
        parse_api_keys(value)
        return value

    @property
    def key_roles(self) -> dict[str, str]:
        return parse_api_keys(self.api_keys)

    @property
    def auth_enabled(self) -> bool:
        """Keys are checked when auth is on, or (auto) whenever keys are configured."""
        if self.auth == "off":
            return False
        return self.auth == "on" or bool(self.key_roles)

    def check_bind_is_safe(self) -> None:
        """Refuse to serve on a non-local address without keys unless auth was switched off explicitly."""
        if self.host not in LOCAL_HOSTS and self.auth != "off" and not self.key_roles:
            raise ValueError(
                f"refusing to listen on {self.host} without API keys: set CALIBSERVE_API_KEYS "
                '("key:admin,key2:read") or CALIBSERVE_AUTH=off explicitly'
            )


def parse_api_keys(value: str) -> dict[str, str]:
    """Parse ``"key1:admin,key2:read"`` into ``{key: role}``; a bad entry raises ValueError.

    Messages name the entry by its position, never by its text: the text is a secret.
    """
    roles: dict[str, str] = {}
    entries = [part.strip() for part in value.split(",")]
    for position, entry in enumerate(entries, start=1):
        if not entry:
            continue
        key, sep, role = entry.rpartition(":")
        if not sep:
            raise ValueError(f'API key entry {position} has no role: write it as "key:read" or "key:admin"')
        if not key:
            raise ValueError(f"API key entry {position} has an empty key before ':{role}'")
        if role not in ROLES:
            raise ValueError(
                f'API key entry {position} has role {role[:20]!r}; the roles are "read" and "admin"'
            )
        if key in roles:
            raise ValueError(
                f"API key entry {position} repeats an earlier key; give each key once, with one role"
            )
        roles[key] = role
    return roles


def role_of(key: str, key_roles: dict[str, str]) -> str | None:
    """The role of ``key``, compared in constant time against every configured key."""
    found = None
    for candidate, role in key_roles.items():
        if hmac.compare_digest(candidate.encode(), key.encode()):
            found = role
    return found


@lru_cache
def get_settings() -> Settings:
    return Settings()
