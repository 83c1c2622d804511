"""The control plane's certificate authority: CA, server certificate, agent certificates.

Why our own CA: agents are identified by the certificate the control plane
issued at enrollment (CN = agent id, SPIFFE URI SAN naming tenant/site/agent),
and TLS verification against this CA alone is the first gate of every agent
route. All cryptography is delegated to ``cryptography``; this module only
chooses parameters and persists files (keys 0600, written atomically, created
under a file lock so several ``serve`` processes sharing a data dir agree on
one CA).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nkudo.cp.errors import BadRequest, Unavailable
from nkudo.log import get_logger

log = get_logger("cp.pki")

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
MIN_RSA_BITS = 2048
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
CLOCK_SKEW = dt.timedelta(minutes=5)
#: nextUpdate - thisUpdate of the CRL; it is re-signed at half that age (and whenever revocations change).
CRL_VALIDITY = dt.timedelta(days=1)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def serial_hex(n: int) -> str:
    """Canonical text form of a certificate serial (lowercase hex, no leading zeros)."""
    return format(n, "x")


def spiffe_id(tenant_id: str, site_id: str, agent_id: str) -> str:
    return f"spiffe://nkudo/tenant/{tenant_id}/site/{site_id}/agent/{agent_id}"


@dataclass(frozen=True, slots=True)
class IssuedCert:
    pem: str
    serial: str
    not_after: dt.datetime


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    """One CRL entry: serial (canonical hex), revocation time, RFC 5280 reason (``x509.ReasonFlags`` value).

    ``reason`` ``None`` writes no reason code, which RFC 5280 prefers to ``unspecified``.
    """

    serial: str
    revoked_at: dt.datetime
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class SignedCrl:
    """A signed CRL in both encodings (one signature: the PEM is the DER armoured)."""

    der: bytes
    pem: bytes
    this_update: dt.datetime
    next_update: dt.datetime


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 atomically (never world-readable, not even briefly)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    fd = os.open(data_dir / ".pki.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class CertificateAuthority:
    """An ECDSA P-256 CA that signs agent client certificates and the server certificate."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
        self.cert = cert
        self.key = key
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        self._ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())

    # --- loading ---------------------------------------------------------------

    @classmethod
    def generate(cls, common_name: str = "nkudo-agent-ca") -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nkudo")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise Unavailable("CA key must be an ECDSA or RSA private key", code="PKI_INVALID")
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise Unavailable("CA certificate and key do not match", code="PKI_INVALID")
        return cls(cert, key)

    @classmethod
    def load_or_create(
        cls,
        data_dir: Path,
        *,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        require_persistent: bool = False,
    ) -> CertificateAuthority:
        """Load the CA from explicit files or the data dir, creating it there on first start.

        With ``require_persistent`` a missing CA is an error instead: an
        operator who asked for persistence must not get a fresh CA that
        silently orphans every enrolled agent.
        """
        if (cert_file is None) != (key_file is None):
            raise Unavailable("--ca-cert-file and --ca-key-file must be given together", code="PKI_INVALID")
        if cert_file is not None and key_file is not None:
            return cls.from_pem(cert_file.read_bytes(), key_file.read_bytes())
        data_dir.mkdir(parents=True, exist_ok=True)
        with _locked(data_dir):
            cp, kp = data_dir / CA_CERT, data_dir / CA_KEY
            if cp.exists() and kp.exists():
                if kp.stat().st_mode & 0o077:
                    os.chmod(kp, 0o600)
                return cls.from_pem(cp.read_bytes(), kp.read_bytes())
            if require_persistent:
                raise Unavailable(
                    f"no CA in {data_dir} and --require-persistent-pki is set", code="PKI_MISSING"
                )
            ca = cls.generate()
            _write_private(kp, ca.key_pem())
            _write_public(cp, ca.cert_pem.encode())
            log.info("created control-plane CA", path=str(cp))
            return ca

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    # --- issuing ---------------------------------------------------------------

    def _base(self, subject: x509.Name, public_key: object, not_after: dt.datetime) -> x509.CertificateBuilder:
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski), critical=False)
        )

    def issue_server(self, names: list[str], days: int = 365) -> tuple[bytes, bytes]:
        """A server certificate (PEM cert chain, PEM key) for ``names`` (DNS names or IPs)."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        cert = (
            self._base(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]), key.public_key(),
                       _now() + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(_key_usage(key.public_key()), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem.encode()
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return chain, key_pem

    def write_server_files(self, data_dir: Path, names: list[str]) -> tuple[Path, Path]:
        """Issue a fresh server certificate into the data dir (each start: names may change)."""
        chain, key = self.issue_server(names)
        cp, kp = data_dir / SERVER_CERT, data_dir / SERVER_KEY
        with _locked(data_dir):
            _write_private(kp, key)
            _write_public(cp, chain)
        return cp, kp

    def sign_agent(
        self, csr: x509.CertificateSigningRequest, *, agent_id: str, tenant_id: str, site_id: str,
        ttl: dt.timedelta, crl_url: str | None = None,
    ) -> IssuedCert:
        """Issue an agent client certificate: CN = agent id, SPIFFE URI SAN, clientAuth only.

        The CSR's subject and extensions are ignored on purpose: identity comes
        from the control plane, only the public key comes from the agent.
        ``crl_url`` becomes the certificate's CRL distribution point, so a relying
        party other than the control plane (a proxy, an auditor with openssl) can
        find where revocations of it are published.
        """
        pub = csr.public_key()
        not_after = _now() + ttl
        builder = (
            self._base(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent_id),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nkudo-agent")]),
                pub, not_after,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id(tenant_id, site_id, agent_id))]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(_key_usage(pub), critical=True)
        )
        if crl_url:
            builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(crl_url)], relative_name=None, reasons=None,
                crl_issuer=None)]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return IssuedCert(
            pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            serial=serial_hex(cert.serial_number),
            not_after=cert.not_valid_after_utc,
        )

    def sign_crl(self, revoked: Sequence[RevokedEntry], *, number: int,
                 validity: dt.timedelta = CRL_VALIDITY) -> SignedCrl:
        """A CRL of the revoked certificates signed by the CA, in DER and PEM.

        Always a complete, signed CRL, even with zero entries: relying parties
        that fetch it before the first revocation must get something they can
        verify (the original served an empty body). CRL number and AKI are
        included because RFC 5280 requires them of conforming issuers; each
        entry carries its reason code so a relying party can tell a compromised
        key from a retired or superseded certificate.
        """
        now = _now().replace(microsecond=0)  # X.509 times have second precision; keep the returned value exact
        nxt = now + validity
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now)
            .next_update(nxt)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski), critical=False)
        )
        for entry in revoked:
            rb = x509.RevokedCertificateBuilder().serial_number(int(entry.serial, 16)).revocation_date(
                entry.revoked_at)
            flag = _reason_flag(entry.reason)
            if flag is not None:
                rb = rb.add_extension(x509.CRLReason(flag), critical=False)
            b = b.add_revoked_certificate(rb.build())
        crl = b.sign(self.key, hashes.SHA256())
        return SignedCrl(der=crl.public_bytes(serialization.Encoding.DER),
                         pem=crl.public_bytes(serialization.Encoding.PEM), this_update=now, next_update=nxt)


def _reason_flag(reason: str | None) -> x509.ReasonFlags | None:
    """The reason code of a stored reason; none for ``unspecified`` or a value this version does not know
    (one odd row must not stop the whole CRL from being signed)."""
    if reason is None:
        return None
    try:
        flag = x509.ReasonFlags(reason)
    except ValueError:
        log.warn("unknown revocation reason left out of the CRL entry", reason=reason[:40])
        return None
    return None if flag == x509.ReasonFlags.unspecified else flag


def _key_usage(pub: object) -> x509.KeyUsage:
    rsa_key = isinstance(pub, rsa.RSAPublicKey)
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=rsa_key,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )


def parse_csr(csr_pem: str, field: str = "csr_pem") -> x509.CertificateSigningRequest:
    """Parse and check a CSR: valid PEM, valid self-signature, ECDSA P-256/P-384 or RSA >= 2048."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise BadRequest(f"csr_pem is not a PEM certificate request: {exc}", code="INVALID_CSR", field=field)
    try:
        ok = csr.is_signature_valid
    except (InvalidSignature, ValueError):
        ok = False
    if not ok:
        raise BadRequest("CSR signature does not verify", code="INVALID_CSR", field=field)
    try:
        pub = csr.public_key()
    except Exception:  # unsupported algorithms raise various errors
        raise BadRequest("CSR public key algorithm is not supported", code="INVALID_CSR", field=field)
    if isinstance(pub, ec.EllipticCurvePublicKey):
        if not isinstance(pub.curve, ALLOWED_CURVES):
            raise BadRequest(f"ECDSA curve {pub.curve.name} not accepted (use P-256)", code="INVALID_CSR",
                             field=field)
    elif isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < MIN_RSA_BITS:
            raise BadRequest(f"RSA key of {pub.key_size} bits is too small (min {MIN_RSA_BITS})",
                             code="INVALID_CSR", field=field)
    else:
        raise BadRequest("CSR key must be ECDSA P-256 (preferred) or RSA >= 2048", code="INVALID_CSR", field=field)
    return csr


def make_csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str = "nkudo-agent") -> str:
    """Build a CSR (what an agent does); used by the CLI, tests and the load generator."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()
