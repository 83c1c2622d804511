"""The one table of the agent CLI: every command, its help and its options.

Each :class:`Opt` says name, type (``kind``), default, environment variable, help
and choices; each :class:`Command` says its help text, its options and whether the
start-up fast path serves it. :mod:`nkudo.cli.app` builds the click commands from
this table and :func:`fast_parse` parses from it, so the two cannot disagree on
what an option is called, accepts or defaults to.

Why two parsers: importing click costs ~40 ms on small edge hosts, which would
triple the start-up of ``nkudo-edge version`` and ``check`` (run by monitoring
and provisioning scripts). :func:`fast_parse` recognises only plain, valid
invocations of the fast commands. Anything else (``--help``, unknown or invalid
options, other commands) returns None and goes to click, which owns every usage
error message; both paths then run the same runner and report errors through
:mod:`nkudo.cli.output`. ``NKUDO_CLI_FORCE_CLICK=1`` sends every invocation
through click (tests/host/test_cli_paths_equal.py proves both paths equal with it).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Literal

    #: How a value is converted and validated (see :func:`convert`).
    Kind = Literal["str", "path", "ifname", "int", "float"]


class Opt:
    """One option: flag, type, default, environment variable, choices and help."""

    __slots__ = (
        "choices",
        "default",
        "envvar",
        "flag",
        "help",
        "is_flag",
        "kind",
        "multiple",
        "name",
        "required",
    )

    def __init__(
        self,
        flag: str,
        *,
        default: Any = None,
        envvar: str | None = None,
        choices: tuple[str, ...] | None = None,
        kind: Kind = "str",
        is_flag: bool = False,
        multiple: bool = False,
        required: bool = False,
        help: str = "",
    ) -> None:
        self.flag = flag
        self.name = flag.lstrip("-").replace("-", "_")
        self.default = default
        self.envvar = envvar
        self.choices = choices
        self.kind = kind
        self.is_flag = is_flag
        self.multiple = multiple
        self.required = required
        self.help = help


GLOBAL_OPTS = (
    Opt(
        "--log-format",
        default="text",
        envvar="NKUDO_LOG_FORMAT",
        choices=("text", "json"),
        help="Log line format.",
    ),
    Opt(
        "--log-level",
        default="info",
        envvar="NKUDO_LOG_LEVEL",
        choices=("debug", "info", "warn", "error"),
        help="Minimum level logged.",
    ),
    Opt(
        "--state-dir",
        default="/var/lib/nkudo-edge/state",
        envvar="NKUDO_STATE_DIR",
        kind="path",
        help="Agent state directory.",
    ),
)

GLOBAL_NAMES = frozenset(o.name for o in GLOBAL_OPTS)

#: The global options as accepted after the command: no default and no environment
#: variable of their own, so an absent one leaves the value given before the command
#: (or by NKUDO_*) in place.
GLOBAL_OPTS_AFTER = tuple(
    Opt(o.flag, choices=o.choices, kind=o.kind, help=f"{o.help} Also accepted before the command.")
    for o in GLOBAL_OPTS
)

RUNTIME_DIR_OPT = Opt(
    "--runtime-dir",
    default="/var/lib/nkudo-edge/vms",
    envvar="NKUDO_RUNTIME_DIR",
    kind="path",
    help="VM runtime directory.",
)
KVM_DEVICE_OPT = Opt(
    "--kvm-device", default="/dev/kvm", envvar="NKUDO_KVM_DEVICE", kind="path", help="KVM device to probe."
)

JSON_OPT = Opt("--json", is_flag=True, default=False, help="Print JSON instead of text.")

CHECK_IDS = (
    "kvm", "kvm_exec", "cpu_virt", "kernel", "tun", "vhost_net", "cloud_hypervisor", "qemu", "bridge",
    "state_dir", "disk", "memory", "netbird", "cgroup", "privileges", "pidfd",
)  # fmt: skip

COMMAND_OPTS: dict[str, tuple[Opt, ...]] = {
    "version": (JSON_OPT,),
    "check": (
        JSON_OPT,
        KVM_DEVICE_OPT,
        Opt(
            "--tun-device",
            default="/dev/net/tun",
            envvar="NKUDO_TUN_DEVICE",
            kind="path",
            help="TUN device to probe.",
        ),
        Opt(
            "--cloud-hypervisor-bin",
            default="cloud-hypervisor",
            envvar="NKUDO_CLOUD_HYPERVISOR_BIN",
            help="Cloud Hypervisor binary (name on PATH or path).",
        ),
        Opt(
            "--bridge",
            default="br0",
            envvar="NKUDO_BRIDGE",
            kind="ifname",
            help="Bridge the VMs' TAPs attach to.",
        ),
        RUNTIME_DIR_OPT,
        Opt(
            "--min-disk-gib",
            default=10.0,
            envvar="NKUDO_MIN_DISK_GIB",
            kind="float",
            help="Free disk required (GiB).",
        ),
        Opt(
            "--min-memory-mib",
            default=1024,
            envvar="NKUDO_MIN_MEMORY_MIB",
            kind="int",
            help="Available memory required (MiB).",
        ),
        Opt(
            "--netbird-enabled",
            is_flag=True,
            default=False,
            envvar="NKUDO_NETBIRD_ENABLED",
            help="Also check NetBird.",
        ),
        Opt("--skip", multiple=True, default=(), choices=CHECK_IDS, help="Skip a check by id (repeatable)."),
    ),
}

COMMAND_OPTS["hostfacts"] = (
    RUNTIME_DIR_OPT,
    KVM_DEVICE_OPT,
)

PKI_OPT = Opt(
    "--pki-dir",
    default="/var/lib/nkudo-edge/pki",
    envvar="NKUDO_PKI_DIR",
    kind="path",
    help="Agent credentials directory.",
)

# Options of everything that runs VMs (apply, run, unenroll's VM clean-up).
AGENT_OPTS: tuple[Opt, ...] = (
    RUNTIME_DIR_OPT,
    Opt(
        "--snapshot-dir",
        default="/var/lib/nkudo-edge/snapshots",
        envvar="NKUDO_SNAPSHOT_DIR",
        kind="path",
        help="Snapshot directory.",
    ),
    Opt(
        "--image-root",
        multiple=True,
        default=("/var/lib/nkudo-edge/images",),
        envvar="NKUDO_IMAGE_ROOT",
        kind="path",
        help="Directory plans may take kernels, firmware and images from (repeatable).",
    ),
    Opt(
        "--cloud-hypervisor-bin",
        default="cloud-hypervisor",
        envvar="NKUDO_CLOUD_HYPERVISOR_BIN",
        help="Cloud Hypervisor binary (nkudo-ch-sim to simulate).",
    ),
    Opt(
        "--provider",
        default="cloud-hypervisor",
        envvar="NKUDO_PROVIDER",
        choices=("cloud-hypervisor", "qemu"),
        help="Hypervisor that runs the VMs.",
    ),
    Opt(
        "--qemu-bin",
        default="qemu-system-x86_64",
        envvar="NKUDO_QEMU_BIN",
        help="QEMU binary for --provider qemu (name on PATH or path).",
    ),
    Opt(
        "--qemu-accel",
        default="auto",
        envvar="NKUDO_QEMU_ACCEL",
        choices=("auto", "kvm", "tcg"),
        help="QEMU accelerator; auto uses KVM only where it is proven to run guests, else TCG.",
    ),
    Opt(
        "--bridge",
        default="br0",
        envvar="NKUDO_BRIDGE",
        kind="ifname",
        help="Bridge that must exist before VMs are created.",
    ),
    Opt(
        "--exec-allow",
        multiple=True,
        default=(),
        kind="path",
        help="Executable CommandExecute may run (absolute path, repeatable).",
    ),
    Opt(
        "--net-backend",
        default="auto",
        envvar="NKUDO_NET_BACKEND",
        choices=("auto", "native", "twin", "pyroute2"),
        help="Netlink backend for bridges and TAPs.",
    ),
    Opt(
        "--console-max-mib",
        default=2,
        envvar="NKUDO_CONSOLE_MAX_MIB",
        kind="int",
        help="Serial console output kept on disk per VM (MiB); older output is deallocated in place.",
    ),
)

COMMAND_OPTS["apply"] = (
    JSON_OPT,
    Opt("--plan", required=True, kind="str", help="Plan file (JSON), or - for standard input."),
    *AGENT_OPTS,
)

COMMAND_OPTS["enroll"] = (
    JSON_OPT,
    Opt(
        "--control-plane",
        required=True,
        envvar="NKUDO_CONTROL_PLANE",
        kind="str",
        help="Control plane URL (https://host:port).",
    ),
    Opt("--token", envvar="NKUDO_ENROLL_TOKEN", kind="str", help="One-time enrollment token."),
    Opt("--token-file", kind="path", help="Read the enrollment token from this file."),
    Opt(
        "--ca-file",
        envvar="NKUDO_CA_FILE",
        kind="path",
        help="CA certificate that signed the control plane's certificate.",
    ),
    Opt("--hostname", kind="str", help="Host name to register (default: this host's name)."),
    Opt("--label", multiple=True, default=(), kind="str", help="Label KEY=VALUE for the host (repeatable)."),
    Opt(
        "--insecure-skip-verify",
        is_flag=True,
        default=False,
        help="Do not verify the control plane's certificate (development only).",
    ),
    Opt("--force", is_flag=True, default=False, help="Enroll again even if this host is already enrolled."),
    PKI_OPT,
)

COMMAND_OPTS["run"] = (
    *AGENT_OPTS,
    PKI_OPT,
    Opt(
        "--metrics-addr",
        default=":9090",
        envvar="NKUDO_METRICS_ADDR",
        kind="str",
        help="Prometheus metrics address, or 'off'.",
    ),
    Opt(
        "--heartbeat-interval",
        kind="float",
        envvar="NKUDO_HEARTBEAT_INTERVAL",
        help="Seconds between heartbeats (default: the server's, 15).",
    ),
    Opt(
        "--max-backoff",
        default=60.0,
        kind="float",
        envvar="NKUDO_MAX_BACKOFF",
        help="Longest wait between retries while the control plane is unreachable.",
    ),
    Opt(
        "--shutdown-timeout",
        default=30.0,
        kind="float",
        help="Seconds to let the running action finish on SIGTERM.",
    ),
    Opt("--once", is_flag=True, default=False, help="One heartbeat, run what it leased, report, exit."),
)

COMMAND_OPTS["status"] = (
    JSON_OPT,
    PKI_OPT,
    Opt("--check-connection", is_flag=True, default=False, help="Also contact the control plane."),
)

COMMAND_OPTS["unenroll"] = (
    JSON_OPT,
    PKI_OPT,
    Opt("--yes", is_flag=True, default=False, help="Do not ask for confirmation."),
    Opt("--keep-vms", is_flag=True, default=False, help="Leave the VMs running."),
    Opt("--delete-vms", is_flag=True, default=False, help="Stop and delete the VMs (the default)."),
    Opt(
        "--reason",
        default="retired",
        choices=("compromised", "retired"),
        help="Why: 'compromised' has the certificate revoked for key compromise, 'retired' for end of service.",
    ),
    Opt(
        "--force",
        is_flag=True,
        default=False,
        help="Clean up locally even if the control plane cannot be reached.",
    ),
    *AGENT_OPTS,
)

COMMAND_OPTS["renew"] = (
    JSON_OPT,
    PKI_OPT,
    Opt("--force", is_flag=True, default=False, help="Renew even outside the renewal window."),
)

COMMAND_OPTS["verify-heartbeat"] = (JSON_OPT, PKI_OPT)

COMMAND_OPTS["console"] = (
    RUNTIME_DIR_OPT,
    Opt("--lines", default=50, kind="int", help="How many of the last lines to print (1-10000)."),
    Opt("--follow", is_flag=True, default=False, help="Keep printing new console output until interrupted."),
)


class Command:
    """One command: its help text, its options (from COMMAND_OPTS), its positional arguments (upper-case
    names, each a required string; only click parses them, so a command with any is not a fast one) and
    whether the fast path serves it."""

    __slots__ = ("args", "fast", "help", "name", "opts")

    def __init__(self, name: str, help: str, *, fast: bool = False, args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.help = help
        self.opts = COMMAND_OPTS[name]
        self.fast = fast and not args
        self.args = args


#: The top-level help of ``nkudo-edge``.
PROG_HELP = "nkudo edge agent: runs Cloud Hypervisor microVMs on this host."

# `run` is a long-lived daemon: skipping click keeps ~4 MB out of its resident memory for its whole life.
COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("version", "Print versions and which native modules are loaded.", fast=True),
        Command(
            "check",
            "Preflight: check that this host can run microVMs. "
            "Exit 0 when nothing failed (warnings allowed), 1 otherwise.",
            fast=True,
        ),
        Command("hostfacts", "Print the host facts sent with each heartbeat, as JSON."),
        Command(
            "enroll", "Enroll this host with a one-time token (creates the agent's key and certificate)."
        ),
        Command(
            "run",
            "Run the agent: heartbeats, leased plans, results, logs, metrics. "
            "SIGTERM stops it cleanly; VMs keep running.",
            fast=True,
        ),
        Command("status", "Enrollment, certificate, last heartbeat and VM counts, from local state."),
        Command(
            "unenroll",
            "Leave the control plane: revoke the certificate, remove credentials, delete (or keep) the VMs.",
        ),
        Command("renew", "Renew the agent certificate now (within the renewal window unless --force)."),
        Command(
            "verify-heartbeat", "One heartbeat round trip; exit 0 on success, 1 with the reason otherwise."
        ),
        Command(
            "apply",
            "Run a plan locally (no control plane): one line per action. "
            "Exit 0 only if every action succeeded.",
        ),
        Command(
            "console",
            "Print the last lines of a VM's serial console, control sequences removed; --follow keeps printing.",
            args=("VM_ID",),
        ),
    )
}
FAST_COMMANDS = frozenset(name for name, c in COMMANDS.items() if c.fast)
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off", ""}


class _Reject(Exception):
    pass


def convert(opt: Opt, raw: str) -> Any:
    """Convert and validate one value; raise ValueError with a sentence naming the option."""
    if opt.choices is not None and raw not in opt.choices:
        raise ValueError(f"{opt.flag} must be one of {', '.join(opt.choices)} (got {raw!r})")
    if opt.kind == "int":
        v = int(raw)
        if v < 0:
            raise ValueError(f"{opt.flag} must not be negative")
        return v
    if opt.kind == "float":
        f = float(raw)
        if not (f >= 0 and f < 1e9):
            raise ValueError(f"{opt.flag} must be a non-negative number")
        return f
    if opt.kind in ("path", "str", "ifname"):
        if not raw or "\0" in raw:
            raise ValueError(f"{opt.flag} must be a non-empty string without NUL bytes")
        if opt.kind == "ifname":
            from nkudo.net.rtnl import valid_ifname

            if not valid_ifname(raw):
                raise ValueError(
                    f"{opt.flag} {raw!r} is not a valid interface name (1-15 characters, no '/', ':' or spaces)"
                )
    return raw


def _from_env(opt: Opt) -> Any:
    raw = os.environ.get(opt.envvar) if opt.envvar is not None else None
    if not raw:  # as click: an empty variable counts as unset
        return opt.default
    if opt.is_flag:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise _Reject
    try:
        if opt.multiple:  # as click: a repeatable option's variable holds values separated by whitespace
            return tuple(convert(opt, v) for v in raw.split())
        return convert(opt, raw)
    except ValueError:
        raise _Reject from None


def _parse_opts(
    args: list[str], specs: tuple[Opt, ...], out: dict[str, Any], keep: frozenset[str] = frozenset()
) -> list[str]:
    """Consume leading options of ``specs`` from ``args``; return the rest.

    Options named in ``keep`` that are not given keep their value in ``out`` (the global
    options already parsed before the command) instead of falling back to env/default.
    """
    by_flag = {o.flag: o for o in specs}
    seen: set[str] = set()
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or a == "--":
            break
        flag, eq, val = a.partition("=")
        opt = by_flag.get(flag)
        if opt is None:
            break
        if opt.is_flag:
            if eq:
                raise _Reject
            out[opt.name] = True
            i += 1
        else:
            if not eq:
                if i + 1 >= len(args):
                    raise _Reject
                val = args[i + 1]
                i += 2
            else:
                i += 1
            try:
                v = convert(opt, val)
            except ValueError:
                raise _Reject from None
            if opt.multiple:
                out[opt.name] = (*out.get(opt.name, ()), v) if opt.name in seen else (v,)
            else:
                out[opt.name] = v
        seen.add(opt.name)
    for opt in specs:
        if opt.name not in seen and opt.name not in keep:
            out[opt.name] = _from_env(opt)
    return args[i:]


def fast_parse(argv: list[str]) -> tuple[str, dict[str, Any]] | None:
    """Parse ``[global options] COMMAND [options]`` for a fast command, else None.

    The global options are accepted after the command too (operators write
    ``nkudo-edge run --log-level debug`` as with kubectl or systemctl); given in
    both places, the later one wins, as in click.
    """
    try:
        params: dict[str, Any] = {}
        rest = _parse_opts(argv, GLOBAL_OPTS, params)
        if not rest or rest[0] not in FAST_COMMANDS:
            return None
        cmd = rest[0]
        left = _parse_opts(rest[1:], COMMAND_OPTS[cmd] + GLOBAL_OPTS, params, GLOBAL_NAMES)
        if left:
            return None
        return cmd, params
    except _Reject:
        return None
