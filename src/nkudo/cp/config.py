"""Control-plane settings (flags and ``NKUDO_CP_*`` environment variables map onto this)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from nkudo.errors import ValidationError

ADMIN_KEY_FILE = "admin.key"


@dataclass(slots=True)
class Settings:
    data_dir: Path
    listen_host: str = "0.0.0.0"  # noqa: S104 - a server listens on all interfaces unless told otherwise
    listen_port: int = 8443
    database_url: str | None = None
    admin_key: str | None = field(default=None, repr=False)
    server_names: list[str] = field(default_factory=lambda: ["localhost", "127.0.0.1"])
    ca_cert_file: Path | None = None
    ca_key_file: Path | None = None
    require_persistent_pki: bool = False
    agent_cert_ttl: float = 24 * 3600.0
    enrollment_token_ttl: float = 15 * 60.0
    lease_ttl: float = 45.0
    heartbeat_interval: int = 15
    offline_after: float = 60.0
    sweep_interval: float = 15.0
    max_plans_per_lease: int = 2
    renew_grace: float = 300.0
    idempotency_window: float = 24 * 3600.0
    max_body_bytes: int = 1024 * 1024
    db_pool_size: int = 8
    crl_validity: float = 24 * 3600.0
    #: Bearer token accepted (besides the admin key) on ``GET /metrics``; lets a Prometheus scraper in without
    #: handing it the root credential. Never logged.
    metrics_token: str | None = field(default=None, repr=False)
    #: Optional plain-HTTP listener for load-balancer / kubelet probes that cannot speak TLS; serves only
    #: ``/healthz`` and the detail-free ``/readyz``.
    health_listen: tuple[str, int] | None = None

    def check(self) -> None:
        """Refuse nonsensical combinations before anything starts."""
        positive = {
            "agent_cert_ttl": self.agent_cert_ttl, "enrollment_token_ttl": self.enrollment_token_ttl,
            "lease_ttl": self.lease_ttl, "heartbeat_interval": self.heartbeat_interval,
            "offline_after": self.offline_after, "max_plans_per_lease": self.max_plans_per_lease,
            "max_body_bytes": self.max_body_bytes, "db_pool_size": self.db_pool_size,
            "crl_validity": self.crl_validity,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValidationError(f"{name} must be positive", field=name)
        if self.renew_grace < 0:
            raise ValidationError("renew_grace must not be negative", field="renew_grace")
        if not 0 < self.listen_port < 65536:
            raise ValidationError("port out of range", field="listen")
        if self.health_listen is not None:
            if not 0 < self.health_listen[1] < 65536:
                raise ValidationError("health port out of range", field="health_listen")
            if self.health_listen[1] == self.listen_port:
                raise ValidationError("--health-listen must use another port than --listen", field="health_listen")
        if self.metrics_token is not None and len(self.metrics_token.strip()) < 16:
            raise ValidationError("metrics token must be at least 16 characters", field="metrics_token")
        if not self.server_names:
            raise ValidationError("at least one server name is required", field="server_name")


def parse_listen(value: str, flag: str = "listen") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValidationError(f"--{flag.replace('_', '-')} must be HOST:PORT (got {value!r})", field=flag)
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104


def resolve_admin_key(settings: Settings) -> str:
    """The admin key: given explicitly, or generated once into ``<data-dir>/admin.key`` (0600).

    Why no default key: the original shipped ``dev-admin-key``; a control plane
    reachable from customer sites must not have a guessable root credential.
    """
    if settings.admin_key:
        return settings.admin_key.strip()
    path = settings.data_dir / ADMIN_KEY_FILE
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    key = "nka_" + secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key
