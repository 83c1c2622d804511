"""Tamper-evident audit chains: canonical encoding, hashing, signed checkpoints and verification (sans-I/O).

Why a pure module: the control plane appends with it (``usecases.common.audit``), verifies with it (the
admin route, the background verifier, ``nkudo-control-plane audit verify`` on a copy of the database) and an
outside tool can re-implement it from the README; none of that needs a socket or a database here, so every
rule is testable on plain values and the benchmark measures exactly the verifier's CPU.

The encoding (also in the README, "Audit log"): an event's hash is ``SHA-256`` of the UTF-8 JSON array
``["nkudo-audit/1", chain, seq, occurred_at, tenant_id, actor_type, actor_id, action, object_type, object_id,
request_id, source_ip, details, prev_hash]``, compact (no white space), object keys sorted, non-ASCII
characters as themselves, ``occurred_at`` as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC, always six fractional
digits), absent values ``null``; ``prev_hash`` is the previous event's hash in the chain (64 zeros before
the first). A checkpoint signs ``["nkudo-audit-checkpoint/1", chain, seq, entry_hash, signed_at]``.
"""

from __future__ import annotations

import base64
import bisect
import datetime as dt
import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

GENESIS = "0" * 64
#: The chain of events that belong to no tenant (refused enrollments, lock-outs); tenant chains are named
#: by the tenant id (a UUID, so the two can never collide).
GLOBAL_CHAIN = "global"
EVENT_TAG = "nkudo-audit/1"
CHECKPOINT_TAG = "nkudo-audit-checkpoint/1"

_encode = msgspec.json.Encoder(order="sorted").encode
_decode = msgspec.json.decode
_sha256 = hashlib.sha256

SignKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


class BreakReason(enum.StrEnum):
    """Why verification stopped trusting a chain at an event."""

    CHANGED = "changed"
    DELETED = "deleted"
    INSERTED = "inserted"
    REORDERED = "reordered"
    CHECKPOINT_INVALID = "checkpoint_signature_invalid"


def stamp(ts: dt.datetime) -> str:
    """The one timestamp form that is hashed: UTC, microseconds always written, ``Z``."""
    return ts.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def normalise(details: Any) -> Any:
    """``details`` as it reads back from either database's JSON column (so the stored value hashes the same)."""
    return _decode(_encode(details if details is not None else {}))


def canonical(chain: str, seq: int, occurred_at: dt.datetime, tenant_id: str | None, actor_type: str,
              actor_id: str | None, action: str, object_type: str, object_id: str, request_id: str | None,
              source_ip: str | None, details: Any, prev_hash: str) -> bytes:
    """The bytes whose SHA-256 is the event's ``entry_hash`` (the README writes the same rule down)."""
    return _encode([EVENT_TAG, chain, seq, stamp(occurred_at), tenant_id, actor_type, actor_id, action,
                    object_type, object_id, request_id, source_ip, details, prev_hash])


def entry_hash(*fields: Any) -> str:
    """``SHA-256(canonical(...))`` in lower-case hex; takes ``canonical``'s arguments in order."""
    return _sha256(canonical(*fields)).hexdigest()


class StoredEvent(Protocol):
    """A stored event as verification reads it (a database row or a test's record)."""

    @property
    def id(self) -> int: ...
    @property
    def chain(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def occurred_at(self) -> dt.datetime: ...
    @property
    def tenant_id(self) -> str | None: ...
    @property
    def actor_type(self) -> str: ...
    @property
    def actor_id(self) -> str | None: ...
    @property
    def action(self) -> str: ...
    @property
    def object_type(self) -> str: ...
    @property
    def object_id(self) -> str: ...
    @property
    def request_id(self) -> str | None: ...
    @property
    def source_ip(self) -> str | None: ...
    @property
    def details(self) -> Any: ...
    @property
    def prev_hash(self) -> str: ...
    @property
    def entry_hash(self) -> str: ...


def event_bytes(e: StoredEvent) -> bytes:
    return canonical(e.chain, e.seq, e.occurred_at, e.tenant_id, e.actor_type, e.actor_id, e.action,
                     e.object_type, e.object_id, e.request_id, e.source_ip, e.details, e.prev_hash)


# --- checkpoints ----------------------------------------------------------------


def checkpoint_statement(chain: str, seq: int, head_hash: str, signed_at: dt.datetime) -> bytes:
    """The bytes a checkpoint signature covers."""
    return _encode([CHECKPOINT_TAG, chain, seq, head_hash, stamp(signed_at)])


def key_id(public: PublicKey) -> str:
    """SHA-256 of the key's SubjectPublicKeyInfo (DER), hex: which key signed a checkpoint."""
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


class Verifier:
    """Checks checkpoint signatures with public keys only (what a verifier of a database copy has)."""

    def __init__(self, keys: Sequence[PublicKey]) -> None:
        self.keys = {key_id(k): k for k in keys}

    @classmethod
    def from_pem(cls, *pems: bytes) -> Verifier:
        """From PEM certificates, public keys or private keys (only their public halves are kept)."""
        keys: list[PublicKey] = []
        for pem in pems:
            keys.append(_public_from_pem(pem))
        return cls(keys)

    def verify(self, kid: str, signature: str, statement: bytes) -> bool:
        key = self.keys.get(kid)
        if key is None:
            return False
        try:
            sig = base64.b64decode(signature, validate=True)
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(sig, statement, ec.ECDSA(hashes.SHA256()))
            elif isinstance(key, rsa.RSAPublicKey):
                key.verify(sig, statement, padding.PKCS1v15(), hashes.SHA256())
            else:
                key.verify(sig, statement)
        except (InvalidSignature, ValueError):
            return False
        return True


class Signer:
    """Signs checkpoints with a private key the database never holds (the CA key or ``--audit-key-file``)."""

    def __init__(self, key: SignKey) -> None:
        self._key = key
        self.public: PublicKey = key.public_key()
        self.key_id = key_id(self.public)

    @classmethod
    def from_pem(cls, pem: bytes) -> Signer:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise ValueError("the audit key must be an ECDSA, RSA or Ed25519 private key")
        return cls(key)

    def sign(self, statement: bytes) -> str:
        k = self._key
        if isinstance(k, ec.EllipticCurvePrivateKey):
            sig = k.sign(statement, ec.ECDSA(hashes.SHA256()))
        elif isinstance(k, rsa.RSAPrivateKey):
            sig = k.sign(statement, padding.PKCS1v15(), hashes.SHA256())
        else:
            sig = k.sign(statement)
        return base64.b64encode(sig).decode()

    def verifier(self) -> Verifier:
        return Verifier([self.public])


def _public_from_pem(pem: bytes) -> PublicKey:
    key: Any
    if b"CERTIFICATE" in pem:
        key = x509.load_pem_x509_certificate(pem).public_key()
    elif b"PRIVATE KEY" in pem:
        key = serialization.load_pem_private_key(pem, password=None).public_key()
    else:
        key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise ValueError("the audit key must be an ECDSA, RSA or Ed25519 key")
    return key


# --- verification ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    chain: str
    seq: int
    entry_hash: str
    signed_at: dt.datetime
    key_id: str
    signature: str


@dataclass(frozen=True, slots=True)
class Head:
    """The chain head row: what the last append left (updated in the append's transaction)."""

    seq: int
    entry_hash: str


@dataclass(frozen=True, slots=True)
class Break:
    """The first event of a chain that verification cannot trust, and why."""

    chain: str
    seq: int
    event_id: int | None
    reason: BreakReason
    detail: str


@dataclass(frozen=True, slots=True)
class ChainResult:
    chain: str
    events: int
    head_seq: int
    checkpoints: int
    #: The highest sequence number a valid checkpoint signature covers (0 if none).
    signed_seq: int
    broken: Break | None


def verify_chain(chain: str, events: Sequence[StoredEvent], head: Head | None, checkpoints: Sequence[Checkpoint],
                 verifier: Verifier, *, base: Checkpoint | None = None) -> ChainResult:
    """Verify one chain: ``events`` sorted by ``(seq, id)``; with ``base``, only the events after it.

    Every event must link to its predecessor's hash, recompute to its own hash, carry the next sequence
    number and a larger id than its predecessor (ids are allocated under the chain lock, so storage order
    is chain order); the head row must name the last event; every checkpoint must carry a valid signature
    by a known key over the hash the chain has at its sequence number. The first violation (lowest
    sequence number) is reported with the kind of tampering it shows.
    """
    found: list[Break] = []  # on a tie the earlier finding wins: the head's verdict is the most specific
    last_seq = events[-1].seq if events else (base.seq if base else 0)
    if head is not None:
        hb = _check_head(chain, events, head, last_seq)
        if hb is not None:
            found.append(hb)
    elif events:
        found.append(Break(chain, events[0].seq, events[0].id, BreakReason.INSERTED,
                           "events exist for a chain that was never appended to (no chain head)"))
    b = _walk(chain, events, base)
    if b is not None:
        found.append(b)
    signed = base.seq if base else 0
    cps = [base, *checkpoints] if base else list(checkpoints)
    seqs = [e.seq for e in events]
    for cp in cps:
        cb = _check_checkpoint(chain, cp, events, seqs, verifier, last_seq)
        if cb is not None:
            found.append(cb)
        else:
            signed = max(signed, cp.seq)
    broken = min(found, key=lambda x: x.seq) if found else None
    return ChainResult(chain, len(events), head.seq if head else last_seq, len(checkpoints), signed, broken)


def _walk(chain: str, events: Sequence[StoredEvent], base: Checkpoint | None) -> Break | None:
    prev_hash, expected, prev_id = (base.entry_hash, base.seq + 1, -1) if base else (GENESIS, 1, -1)
    sha = _sha256
    for i, e in enumerate(events):
        seq = e.seq
        if seq < expected:
            return Break(chain, seq, e.id, BreakReason.INSERTED, f"a second event with sequence number {seq}")
        if e.id <= prev_id:
            if e.prev_hash == events[i - 1].prev_hash:  # ids only grow: the newer one before it was slipped in
                p = events[i - 1]
                return Break(chain, p.seq, p.id, BreakReason.INSERTED,
                             "the event was inserted: it and its successor link to the same predecessor")
            return Break(chain, seq, e.id, BreakReason.REORDERED,
                         f"event id {e.id} is stored after id {prev_id} although chains only grow")
        if seq > expected:
            missing = str(expected) if seq == expected + 1 else f"{expected}..{seq - 1}"
            return Break(chain, expected, None, BreakReason.DELETED, f"events with sequence {missing} are missing")
        if e.prev_hash != prev_hash:
            return _classify_link(chain, events, i, prev_hash)
        if sha(event_bytes(e)).hexdigest() != e.entry_hash:
            return Break(chain, seq, e.id, BreakReason.CHANGED,
                         "the event's fields no longer hash to its stored entry_hash")
        prev_hash, expected, prev_id = e.entry_hash, seq + 1, e.id
    return None


def _classify_link(chain: str, events: Sequence[StoredEvent], i: int, expected_prev: str) -> Break:
    """Event ``i`` does not link to its predecessor: say what kind of tampering explains it."""
    e = events[i]
    where = {x.entry_hash: j for j, x in enumerate(events)}
    j = where.get(e.prev_hash)
    if j is not None and j > i:
        return Break(chain, e.seq, e.id, BreakReason.REORDERED,
                     f"the event links to the event stored at sequence {events[j].seq}, after it")
    if i >= 1 and e.prev_hash == events[i - 1].prev_hash:
        p = events[i - 1]
        return Break(chain, p.seq, p.id, BreakReason.INSERTED,
                     "this event and the next one link to the same predecessor: it was inserted")
    if i + 1 < len(events) and events[i + 1].prev_hash == expected_prev:
        return Break(chain, e.seq, e.id, BreakReason.INSERTED,
                     "the next event links past this one to its predecessor: it was inserted")
    if j is not None:
        return Break(chain, e.seq, e.id, BreakReason.REORDERED,
                     f"the event links to sequence {events[j].seq}, not to its predecessor")
    if i >= 1 and _sha256(event_bytes(e)).hexdigest() == e.entry_hash:
        p = events[i - 1]
        return Break(chain, p.seq, p.id, BreakReason.CHANGED,
                     "the event was changed and re-hashed: its successor links to its former hash")
    return Break(chain, e.seq, e.id, BreakReason.CHANGED, "the event's prev_hash was changed")


def _check_head(chain: str, events: Sequence[StoredEvent], head: Head, last_seq: int) -> Break | None:
    if head.seq > last_seq:
        missing = str(head.seq) if head.seq == last_seq + 1 else f"{last_seq + 1}..{head.seq}"
        return Break(chain, last_seq + 1, None, BreakReason.DELETED,
                     f"the chain head is at {head.seq} but events {missing} are missing")
    if head.seq < last_seq:
        k = bisect.bisect_right([e.seq for e in events], head.seq)
        e = events[k] if k < len(events) else events[-1]
        return Break(chain, e.seq, e.id, BreakReason.INSERTED,
                     f"the event is past the chain head ({head.seq}): no append wrote it")
    if events and events[-1].entry_hash != head.entry_hash:
        e = events[-1]
        return Break(chain, e.seq, e.id, BreakReason.CHANGED, "the last event's hash is not the chain head's")
    return None


def _check_checkpoint(chain: str, cp: Checkpoint, events: Sequence[StoredEvent], seqs: list[int],
                      verifier: Verifier, last_seq: int) -> Break | None:
    statement = checkpoint_statement(chain, cp.seq, cp.entry_hash, cp.signed_at)
    if not verifier.verify(cp.key_id, cp.signature, statement):
        why = "is not by a trusted audit key" if cp.key_id not in verifier.keys else "does not verify"
        return Break(chain, cp.seq, None, BreakReason.CHECKPOINT_INVALID, f"the checkpoint at {cp.seq} {why}")
    if cp.seq > last_seq:
        return Break(chain, last_seq + 1, None, BreakReason.DELETED,
                     f"a signed checkpoint covers sequence {cp.seq} but the chain ends at {last_seq}")
    k = bisect.bisect_left(seqs, cp.seq)
    if k < len(events) and events[k].seq == cp.seq:
        if events[k].entry_hash != cp.entry_hash:
            return Break(chain, cp.seq, events[k].id, BreakReason.CHECKPOINT_INVALID,
                         f"the signed checkpoint at {cp.seq} does not match the chain: history was rewritten")
        return None
    if seqs and seqs[0] > cp.seq:
        return None  # before the verified range (an incremental check from a later checkpoint)
    return Break(chain, cp.seq, None, BreakReason.DELETED, f"the event the checkpoint at {cp.seq} signed is missing")


def link(chain: str, seq: int, occurred_at: dt.datetime, tenant_id: str | None, actor_type: str,
         actor_id: str | None, action: str, object_type: str, object_id: str, request_id: str | None,
         source_ip: str | None, details: Any, prev_hash: str) -> str:
    """The ``entry_hash`` of a new event (the append path's one call)."""
    return entry_hash(chain, seq, occurred_at, tenant_id, actor_type, actor_id, action, object_type, object_id,
                      request_id, source_ip, details, prev_hash)
