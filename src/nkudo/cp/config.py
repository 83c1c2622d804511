"""Control-plane settings (flags and ``NKUDO_CP_*`` environment variables map onto this)."""

from __future__ import annotations

import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nkudo.cp.ratelimit import (
    DEFAULT_LIMITS,
    IPNetwork,
    Limit,
    LockoutPolicy,
    RouteClass,
    parse_limit,
    parse_networks,
)
from nkudo.errors import ValidationError
from nkudo.log import get_logger

log = get_logger("cp.config")

ADMIN_KEY_FILE = "admin.key"
#: An admin key is the root credential; anything shorter than this is refused at start-up.
MIN_ADMIN_KEY_CHARS = 32
#: The longest an invitation may stay valid (issue 13): a forgotten invitation link must not work forever.
MAX_INVITATION_TTL = 30 * 24 * 3600.0


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
    #: CRL distribution point written into issued agent certificates (issue 12); ``None``: this server's
    #: own ``/v1/crl`` (see ``crl_distribution_url``).
    crl_url: str | None = None
    # issue 12 part 1: rate limits per route class (a disabled Limit turns a class off), the proxies whose
    # X-Forwarded-For / X-Real-IP are believed, and the lock-out policy for failed authentication.
    rate_limits: dict[RouteClass, Limit] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    trusted_proxies: tuple[IPNetwork, ...] = ()
    lockout: LockoutPolicy = field(default_factory=LockoutPolicy)
    # issue 12 part 2: the audit chain. The key that signs checkpoints (PEM private key; default: the CA key),
    # how often heads are signed and how often every chain is verified (0 disables either task).
    audit_key_file: Path | None = None
    audit_checkpoint_interval: float = 60.0
    audit_verify_interval: float = 3600.0
    # issue 13: dashboard sessions end after this long without a request (idle) or since login (absolute);
    # invitations are valid this long unless the inviter asks for less (at most MAX_INVITATION_TTL).
    session_idle_timeout: float = 8 * 3600.0
    session_absolute_timeout: float = 7 * 24 * 3600.0
    invitation_ttl: float = 7 * 24 * 3600.0
    #: issue 13: serve the web dashboard under /ui/ on the API's TLS listener (``--ui/--no-ui``).
    ui_enabled: bool = True

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
        if self.admin_key is not None:
            check_admin_key(self.admin_key, "--admin-key / NKUDO_CP_ADMIN_KEY")
        if self.metrics_token is not None and len(presented_secret(self.metrics_token) or "") < 16:
            raise ValidationError("metrics token must be at least 16 printable characters", field="metrics_token")
        if not self.server_names:
            raise ValidationError("at least one server name is required", field="server_name")
        if self.crl_url is not None and not _CRL_URL.match(self.crl_url):
            raise ValidationError("--crl-url must be an http:// or https:// URL of at most 2048 printable "
                                  "characters", field="crl_url")
        self.lockout.check()
        if not 0 < self.session_idle_timeout <= self.session_absolute_timeout:
            raise ValidationError("session_idle_timeout must be positive and at most session_absolute_timeout",
                                  field="session_idle_timeout")
        if not 0 < self.invitation_ttl <= MAX_INVITATION_TTL:
            raise ValidationError(f"invitation_ttl must be between 1 and {int(MAX_INVITATION_TTL)} seconds (30 days)",
                                  field="invitation_ttl")
        for name in ("audit_checkpoint_interval", "audit_verify_interval"):
            if getattr(self, name) < 0:
                raise ValidationError(f"{name} must not be negative (0 disables it)", field=name)


def rate_limit_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The ``Settings`` fields of the rate-limit flags (``--rate-limit-CLASS``, ``--trusted-proxy``,
    ``--lockout-*``), each validated here with an error naming the flag."""
    limits = {cls: parse_limit(str(options[f"rate_limit_{cls.value}"]), f"rate_limit_{cls.value}")
              for cls in RouteClass}
    policy = LockoutPolicy(threshold=int(options["lockout_threshold"]), window=float(options["lockout_window"]),
                           base=float(options["lockout_base"]), max_lock=float(options["lockout_max"]))
    policy.check()
    return {"rate_limits": limits, "trusted_proxies": parse_networks(tuple(options["trusted_proxy"])),
            "lockout": policy}


#: A CRL distribution point: http(s), printable ASCII without spaces (it is written into every agent certificate).
_CRL_URL = re.compile(r"https?://[\x21-\x7e]{1,2040}\Z")


def crl_distribution_url(settings: Settings) -> str:
    """Where issued agent certificates say their CRL is: ``--crl-url``, else this server's own ``/v1/crl``
    under its first server name (the name agents and operators reach it by)."""
    if settings.crl_url:
        return settings.crl_url
    host = settings.server_names[0]
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"https://{host}:{settings.listen_port}/v1/crl"


def parse_listen(value: str, flag: str = "listen") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValidationError(f"--{flag.replace('_', '-')} must be HOST:PORT (got {value!r})", field=flag)
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104


def presented_secret(value: str | None) -> str | None:
    """A credential as presented (header, flag, environment, file), or ``None`` if there is none.

    The one whitespace rule for every key (admin key, API key, metrics token): surrounding whitespace is
    never part of a key (HTTP strips it from header values anyway, and key files end in a newline), so
    it is stripped here and nowhere else. Empty, whitespace-only and non-printable-ASCII values are no
    credential at all: callers treat ``None`` as "not authenticated", which is what keeps an empty
    ``X-Admin-Key:`` header from ever matching an empty configured key.
    """
    if value is None:
        return None
    v = value.strip()
    if not v or not _PRINTABLE.match(v):
        return None
    return v


_PRINTABLE = re.compile(r"[\x21-\x7e]+\Z")


def check_admin_key(key: str | None, source: str) -> str:
    """``key`` normalised, or a start-up error saying what is wrong and how to fix it."""
    v = presented_secret(key)
    if v is None:
        raise ValidationError(f"the admin key from {source} is empty, whitespace-only or not printable ASCII; "
                              f"set at least {MIN_ADMIN_KEY_CHARS} printable characters", field="admin_key",
                              code="ADMIN_KEY_INVALID")
    if len(v) < MIN_ADMIN_KEY_CHARS:
        raise ValidationError(f"the admin key from {source} has {len(v)} characters; it must have at least "
                              f"{MIN_ADMIN_KEY_CHARS}", field="admin_key", code="ADMIN_KEY_INVALID")
    return v


def prepare_data_dir(data_dir: Path) -> None:
    """Create the data directory 0700 and make every file this process creates 0600 (umask 077).

    Why the process umask and not a chmod per file: SQLite creates ``-wal`` and ``-shm`` itself, and
    they hold token and key hashes, the audit log and execution logs just like ``nkudo.db``. An existing
    directory or file that others can read is not changed behind the operator's back; it gets a warning
    saying how to fix it.
    """
    os.umask(0o077)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    loose = [p for p in (data_dir, *(data_dir / n for n in _PRIVATE_FILES))
             if p.exists() and stat.S_IMODE(p.stat().st_mode) & 0o077]
    for p in loose:
        mode = stat.S_IMODE(p.stat().st_mode)
        want = "700" if p.is_dir() else "600"
        log.warn("data directory entry is accessible to other users; it holds credentials and the audit log",
                 path=str(p), mode=f"{mode:o}", fix=f"chmod {want} {p}")


#: Files in the data directory that hold secrets or tenant data (checked for loose modes at start-up).
_PRIVATE_FILES = ("nkudo.db", "nkudo.db-wal", "nkudo.db-shm", ADMIN_KEY_FILE, "ca.key", "server.key")


def resolve_admin_key(settings: Settings) -> str:
    """The admin key: given explicitly, or generated once into ``<data-dir>/admin.key`` (0600).

    Why no default key: the original shipped ``dev-admin-key``; a control plane
    reachable from customer sites must not have a guessable root credential.
    Why the file is written under a temporary name, fsynced and then linked into place: a crash
    between creating and writing ``admin.key`` used to leave an empty file, which became an empty
    admin key. ``os.link`` (not ``rename``) also keeps two replicas starting at once on one data
    directory from each installing their own key: the second one reads the first one's.
    """
    if settings.admin_key is not None:
        return check_admin_key(settings.admin_key, "--admin-key / NKUDO_CP_ADMIN_KEY")
    path = settings.data_dir / ADMIN_KEY_FILE
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not os.path.lexists(path):
        _write_new_key(path, "nka_" + secrets.token_urlsafe(32))
    remedy = f"delete {path} to have a new key generated, or pass --admin-key"
    try:
        text = path.read_bytes().decode("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(f"cannot read the admin key file {path} ({exc}); {remedy}", field="admin_key",
                              code="ADMIN_KEY_INVALID") from None
    if not text.strip():
        raise ValidationError(f"the admin key file {path} is empty (an interrupted first start leaves it so); "
                              f"{remedy}", field="admin_key", code="ADMIN_KEY_INVALID")
    return check_admin_key(text, str(path))


def _write_new_key(path: Path, key: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (key + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and never replaces a key another process installed first
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
