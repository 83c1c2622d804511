"""Agent <-> control plane messages (enroll, heartbeat, plans, results, logs, renew).

Field names keep the Go original's JSON names where they were sound
(``enrollment_token``, ``csr_pem``, ``next_heartbeat_seconds``,
``pending_plans``, ``client_certificate_pem``...). Every struct forbids unknown
fields so that a mistyped field is a 400 that names it, not silently dropped
data; lists and strings are bounded so a single request cannot make the control
plane hold unbounded memory.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec

from nkudo.vmstate import VmStatus
from nkudo.wire.actions import Ident
from nkudo.wire.codec import described
from nkudo.wire.vocab import LogLevel, ReportedStatus

# Patterns end in ``\Z``, not ``$`` (which also matches before a trailing newline; issue 10 item 2).
UUID_PATTERN: Final = described(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z",
    "expected a lower-case UUID (8-4-4-4-12 hex digits)",
)
Uuid = Annotated[str, msgspec.Meta(pattern=UUID_PATTERN)]
Short = Annotated[str, msgspec.Meta(max_length=256)]
HOSTNAME_PATTERN: Final = described(
    r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}\Z",
    "expected a host name: 1-253 letters, digits, '.' or '-', starting with a letter or digit",
)
Hostname = Annotated[str, msgspec.Meta(pattern=HOSTNAME_PATTERN)]
SHA256_PATTERN: Final = described(
    r"^[0-9a-f]{64}\Z",
    "expected 64 lower-case hex digits",
)
Sha256Hex = Annotated[str, msgspec.Meta(pattern=SHA256_PATTERN)]
Pem = Annotated[str, msgspec.Meta(min_length=1, max_length=16 * 1024)]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
Message = Annotated[str, msgspec.Meta(max_length=8192)]
ERROR_CODE_PATTERN: Final = described(
    r"^[A-Z][A-Z0-9_]{0,63}\Z",
    "expected an error code: 1-64 upper-case letters, digits or '_', starting with a letter",
)
ErrorCode = Annotated[str, msgspec.Meta(pattern=ERROR_CODE_PATTERN)]

# The value sets (VM states, result statuses, log levels, execution states) are defined once, in
# ``nkudo.vmstate`` and ``nkudo.wire.vocab``; the JSON they produce is the same text as before.

MAX_VMS_PER_HEARTBEAT: Final = 1000
MAX_LOG_LINES: Final = 1000
MAX_RESULTS: Final = 256


class _Strict(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


# --- enroll -------------------------------------------------------------------


class HostFingerprint(_Strict):
    machine_id_sha256: Sha256Hex | None = None
    bios_uuid_sha256: Sha256Hex | None = None
    primary_mac_sha256: Sha256Hex | None = None


class EnrollRequest(_Strict):
    enrollment_token: Token
    csr_pem: Pem
    hostname: Hostname
    host_fingerprint: HostFingerprint = msgspec.field(default_factory=HostFingerprint)
    agent_version: Short = ""
    os: Short = "linux"
    arch: Short = "amd64"
    kernel_version: Short = ""
    labels: Annotated[dict[Short, Short], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=dict)


class EnrollResponse(_Strict):
    agent_id: str
    tenant_id: str
    site_id: str
    host_id: str
    client_certificate_pem: str
    ca_certificate_pem: str
    refresh_token: str
    certificate_expires_at: datetime
    heartbeat_interval_seconds: int
    heartbeat_endpoint: str = "/v1/heartbeat"


# --- heartbeat ----------------------------------------------------------------


class Disk(_Strict):
    mountpoint: Annotated[str, msgspec.Meta(max_length=4096)]
    total_bytes: Count = 0
    free_bytes: Count = 0


class HostFacts(_Strict):
    cpu_cores: Annotated[int, msgspec.Meta(ge=0, le=65536)] = 0
    memory_total_bytes: Count = 0
    storage_total_bytes: Count = 0
    disks: Annotated[list[Disk], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=list)
    os: Short = ""
    arch: Short = ""
    kernel: Short = ""
    kvm_available: bool = False
    cloud_hypervisor_available: bool = False
    hostname: Hostname | None = None


class VMSummary(_Strict):
    vm_id: Ident
    state: VmStatus
    name: Ident | None = None
    vcpus: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0
    memory_mib: Annotated[int, msgspec.Meta(ge=0, le=4 * 1024 * 1024)] = 0


class VmCounters(_Strict, array_like=True):
    """One VM's kernel counters in a heartbeat (issue 15), compact: a JSON array, not an object.

    ``[vm_id, rx_bytes, rx_packets, rx_drops, tx_bytes, tx_packets, tx_drops, cpu_ms, read_bytes,
    write_bytes, rss_bytes]``: network summed over the VM's TAPs in the VM's direction (``rx`` is what
    the VM received), CPU milliseconds and block bytes of its VMM process, and its resident memory. All
    but ``rss_bytes`` are cumulative since the TAP or VMM was created, so the control plane derives
    rates from two reports. ``null`` means "no live source" (TAP gone, VMM not running), never zero.
    Why an array: a heartbeat can carry a thousand of these every 15 s.
    """

    vm_id: Ident
    rx_bytes: Count | None = None
    rx_packets: Count | None = None
    rx_drops: Count | None = None
    tx_bytes: Count | None = None
    tx_packets: Count | None = None
    tx_drops: Count | None = None
    cpu_ms: Count | None = None
    read_bytes: Count | None = None
    write_bytes: Count | None = None
    rss_bytes: Count | None = None


class ExecutionProgress(_Strict):
    execution_id: Uuid
    #: Only progress is reported mid-action; terminal states travel as ``ActionResult``.
    state: Literal["RUNNING"] = "RUNNING"  # ExecState.RUNNING, as the one value a Literal can name
    message: Message = ""


# --- console tails (issue 15) -----------------------------------------------

#: Characters a console tail may never carry: C0 but newline and tab, DEL, C1, the Unicode line/paragraph
#: separators, direction overrides and marks, and lone surrogates. One definition: the agent's sanitiser
#: removes exactly these (``nkudo.agent.console``) and the control plane refuses a tail that still has one.
CONSOLE_FORBIDDEN: Final = r"\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff"
MAX_CONSOLE_LINES: Final = 1000
MAX_CONSOLE_CHARS: Final = 64 * 1024
MAX_CONSOLE_REQUESTS: Final = 8
ConsoleLines = Annotated[int, msgspec.Meta(ge=1, le=MAX_CONSOLE_LINES)]
CONSOLE_PATTERN: Final = described(
    rf"^[^{CONSOLE_FORBIDDEN}]*\Z",
    "expected text without control or bidi characters other than tab and newline",
)
ConsoleText = Annotated[str, msgspec.Meta(max_length=MAX_CONSOLE_CHARS, pattern=CONSOLE_PATTERN)]


class ConsoleRequest(_Strict):
    """The control plane asks for the last ``lines`` lines of a VM's console (answered on the next heartbeat)."""

    vm_id: Ident
    lines: ConsoleLines = 100


class ConsoleTail(_Strict):
    """An agent's answer to a :class:`ConsoleRequest`: sanitised text, or ``found=False`` (no such console)."""

    vm_id: Ident
    lines: ConsoleLines
    text: ConsoleText = ""
    found: bool = True


class HeartbeatRequest(_Strict):
    heartbeat_seq: Count = 0
    agent_version: Short = ""
    host_facts: HostFacts | None = None
    vms: Annotated[list[VMSummary], msgspec.Meta(max_length=MAX_VMS_PER_HEARTBEAT)] = msgspec.field(
        default_factory=list
    )
    execution_updates: Annotated[list[ExecutionProgress], msgspec.Meta(max_length=MAX_RESULTS)] = msgspec.field(
        default_factory=list
    )
    sent_at: datetime | None = None
    #: Per-VM kernel counters (issue 15); absent from older agents, which stay valid.
    vm_counters: Annotated[list[VmCounters], msgspec.Meta(max_length=MAX_VMS_PER_HEARTBEAT)] = msgspec.field(
        default_factory=list
    )
    #: False for probes (``nkudo-edge verify-heartbeat``): answer, but lease no plans to this call.
    lease: bool = True
    #: Console tails the control plane asked for in the previous heartbeat's answer (issue 15).
    consoles: Annotated[list[ConsoleTail], msgspec.Meta(max_length=MAX_CONSOLE_REQUESTS)] = msgspec.field(
        default_factory=list
    )


class LeasedAction(_Strict):
    execution_id: str
    action_id: str
    #: ``str``, not ``ActionType``: an unknown type must fail that one action (reported FAILED),
    #: not make the agent refuse the whole heartbeat answer.
    type: str
    params: dict[str, Any]
    timeout_seconds: int


class LeasedPlan(_Strict):
    plan_id: str
    site_id: str
    lease_expires_at: datetime
    actions: list[LeasedAction]


class HeartbeatResponse(_Strict):
    next_heartbeat_seconds: int
    pending_plans: list[LeasedPlan]
    rotate_certificate: bool = False
    #: Console tails wanted from this host: ship them in the next heartbeat (issue 15).
    console_requests: list[ConsoleRequest] = msgspec.field(default_factory=list)


class PlansNextResponse(_Strict):
    plans: list[LeasedPlan]


# --- results and logs ---------------------------------------------------------


class ActionResult(_Strict):
    execution_id: Uuid
    status: ReportedStatus
    action_id: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    error_code: ErrorCode | None = None
    message: Message = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ResultReport(_Strict):
    results: Annotated[list[ActionResult], msgspec.Meta(min_length=1, max_length=MAX_RESULTS)]
    plan_id: Uuid | None = None


class ResultOutcome(_Strict):
    execution_id: str
    outcome: Literal["accepted", "duplicate", "rejected"]
    code: str | None = None


class ResultResponse(_Strict):
    results: list[ResultOutcome]


class LogLine(_Strict):
    seq: Count
    message: Message
    level: LogLevel = LogLevel.INFO
    ts: datetime | None = None


class LogBatch(_Strict):
    execution_id: Uuid
    lines: Annotated[list[LogLine], msgspec.Meta(min_length=1, max_length=MAX_LOG_LINES)]


class LogBatchResponse(_Strict):
    accepted: int
    dropped: int


# --- lifecycle ----------------------------------------------------------------


class UnenrollRequest(_Strict):
    """Why the agent leaves: ``compromised`` revokes its certificates with reason keyCompromise, every other
    reason (``retired``, what ``nkudo-edge unenroll`` sends by default) with cessationOfOperation (issue 12)."""

    reason: Literal["retired", "compromised", "decommissioned", "reinstall", "other"] = "decommissioned"


class RenewRequest(_Strict):
    csr_pem: Pem
    refresh_token: Token


class RenewResponse(_Strict):
    client_certificate_pem: str
    ca_certificate_pem: str
    refresh_token: str
    certificate_expires_at: datetime
