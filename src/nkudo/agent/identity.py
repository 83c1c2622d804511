"""The agent's mTLS identity: key, certificate, CA bundle and refresh token on disk, ids in the state store.

Secrets live only in ``--pki-dir`` (directory 0700, files 0600, written
atomically) and never in logs. The key is ECDSA P-256, generated on the host:
it never leaves it; the control plane only sees the CSR.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from nkudo.agent.disks import write_atomic
from nkudo.agent.state import StateStore
from nkudo.errors import NkudoError
from nkudo.wire.vocab import ErrorCode

IDENTITY_KEY = "identity"


@dataclass
class Identity:
    agent_id: str
    tenant_id: str
    site_id: str
    host_id: str
    control_plane: str
    hostname: str
    enrolled_at: str
    heartbeat_interval: int = 15
    insecure_skip_verify: bool = False
    # Validity of the current certificate, recorded when it is written, so the long-running
    # daemon can schedule renewal without loading an X.509 parser (cryptography costs ~11 MB RSS).
    cert_not_before: str | None = None
    cert_not_after: str | None = None

    def renew_due(self, now: dt.datetime | None = None) -> bool | None:
        """Two thirds of the certificate lifetime passed; None when the validity is not recorded."""
        if not self.cert_not_before or not self.cert_not_after:
            return None
        nb = dt.datetime.fromisoformat(self.cert_not_before)
        na = dt.datetime.fromisoformat(self.cert_not_after)
        return (now or dt.datetime.now(dt.UTC)) >= nb + (na - nb) * 2 / 3

    def record_cert(self, pem: bytes) -> None:
        info = cert_info(pem)
        self.cert_not_before = info.not_before.isoformat()
        self.cert_not_after = info.not_after.isoformat()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Identity:
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class Pki:
    """Paths and atomic writes of the credential files."""

    def __init__(self, pki_dir: str) -> None:
        self.dir = pki_dir
        self.key = os.path.join(pki_dir, "agent.key")
        self.cert = os.path.join(pki_dir, "agent.crt")
        self.ca = os.path.join(pki_dir, "ca.crt")
        self.refresh = os.path.join(pki_dir, "refresh-token")

    def ensure_dir(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def write(self, path: str, data: bytes) -> None:
        self.ensure_dir()
        write_atomic(path, data, 0o600)

    def present(self) -> bool:
        return all(os.path.exists(p) for p in (self.key, self.cert, self.ca))

    def read_refresh(self) -> str:
        with open(self.refresh, encoding="ascii") as f:
            return f.read().strip()

    def remove(self) -> list[str]:
        removed = []
        for p in (self.key, self.cert, self.ca, self.refresh):
            if os.path.exists(p):
                os.unlink(p)
                removed.append(p)
        return removed


def new_key_and_csr(common_name: str) -> tuple[bytes, str]:
    """(PEM private key, PEM CSR) for a fresh ECDSA P-256 key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


@dataclass
class CertInfo:
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    subject_cn: str

    def remaining(self, now: dt.datetime | None = None) -> dt.timedelta:
        return self.not_after - (now or dt.datetime.now(dt.UTC))

    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before

    def renew_due(self, now: dt.datetime | None = None) -> bool:
        """Renew at about two thirds of the lifetime."""
        now = now or dt.datetime.now(dt.UTC)
        return now >= self.not_before + self.lifetime() * 2 / 3

    def valid(self, now: dt.datetime | None = None) -> bool:
        now = now or dt.datetime.now(dt.UTC)
        return self.not_before <= now < self.not_after


def cert_info(pem: bytes) -> CertInfo:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(pem)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return CertInfo(
        serial=f"{cert.serial_number:x}",
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        subject_cn=str(cns[0].value) if cns else "",
    )


def load_cert_info(pki: Pki) -> CertInfo | None:
    try:
        with open(pki.cert, "rb") as f:
            return cert_info(f.read())
    except (OSError, ValueError):
        return None


def save_identity(store: StateStore, ident: Identity) -> None:
    store.set_meta(IDENTITY_KEY, ident.to_json())


def load_identity(store: StateStore) -> Identity | None:
    raw = store.get_meta(IDENTITY_KEY)
    return Identity.from_json(raw) if raw else None


def _not_enrolled() -> NkudoError:
    return NkudoError(
        "this host is not enrolled (run: nkudo-edge enroll --control-plane URL --token TOKEN)",
        code=ErrorCode.NOT_ENROLLED,
    )


def require_identity(store: StateStore, pki: Pki) -> Identity:
    ident = load_identity(store)
    if ident is None or not pki.present():
        raise _not_enrolled()
    return ident


def peek_identity(state_dir: str) -> Identity | None:
    """The stored identity, or None, without creating anything.

    Why: opening a :class:`StateStore` creates the state directory and database, so a
    command run on a host that was never enrolled would leave empty state behind.
    """
    if not os.path.isfile(os.path.join(state_dir, "agent.db")):
        return None
    store = StateStore(state_dir)
    try:
        return load_identity(store)
    finally:
        store.close()


def require_enrolled(state_dir: str, pki: Pki) -> Identity:
    """NOT_ENROLLED before any directory or database is created (commands that need an identity)."""
    ident = peek_identity(state_dir)
    if ident is None or not pki.present():
        raise _not_enrolled()
    return ident


def host_fingerprint() -> dict[str, Any]:
    """Hashes of stable host identifiers (never the raw values) for the control plane's host record."""

    def sha(path: str) -> str | None:
        try:
            with open(path, "rb") as f:
                data = f.read().strip()
        except OSError:
            return None
        return hashlib.sha256(data).hexdigest() if data else None

    out: dict[str, Any] = {}
    if (v := sha("/etc/machine-id")) is not None:
        out["machine_id_sha256"] = v
    if (v := sha("/sys/class/dmi/id/product_uuid")) is not None:
        out["bios_uuid_sha256"] = v
    try:
        for name in sorted(os.listdir("/sys/class/net")):
            if name == "lo" or os.path.exists(f"/sys/class/net/{name}/tun_flags"):
                continue
            if (v := sha(f"/sys/class/net/{name}/address")) is not None:
                out["primary_mac_sha256"] = v
                break
    except OSError:
        pass
    return out
