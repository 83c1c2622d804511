"""``nkudo-ch-sim``: a Cloud Hypervisor look-alike for demos and tests (no VM runs).

Started with the same command line as ``cloud-hypervisor`` (``--api-socket``,
``--log-file``, ``-v``, ``--version``, the VM-config flags), it serves the
same REST API on the same Unix socket with the real server's behaviour:
state machine, status codes, JSON-list error bodies, single-threaded
blocking, snapshot files, ``vmm.shutdown``/SIGTERM cleanup, the
``<socket>.lock`` against two instances, ``umask(0o077)``. Request bodies are
validated against the OpenAPI file (``--sim-spec`` / ``$NKUDO_CH_SPEC`` /
the packaged copy). Every request is journaled (``--sim-journal``) so tests
can assert on what a client sent. ``--sim-*`` flags (or ``NKUDO_CH_SIM_*``
environment variables) add latency and faults for reliability tests.

Kept cheap to start (one per VM): heavy imports (PyYAML, jsonschema) happen
in a background thread after the socket is bound.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, ClassVar

from nkudo.chsim import cliconfig
from nkudo.chsim.vmm import BUILD_VERSION, ApiFailure, SimOptions, Vmm

EPILOG = """\
This is the nkudo Cloud Hypervisor simulator, for demos and tests: it speaks
the cloud-hypervisor REST API on --api-socket but runs no virtual machine.

Simulation flags (each also read from the environment: --sim-boot-delay is
NKUDO_CH_SIM_BOOT_DELAY; list flags take comma-separated values there):
  --sim-boot-delay S          vm.boot / vm.reboot / CLI boot take S seconds (server blocked)
  --sim-latency S             every request waits S seconds before it is handled
  --sim-delay CALL=S          one endpoint takes S seconds, e.g. vm.snapshot=2
  --sim-fail CALL=ACTION[:N]  ACTION is an HTTP status (500, 404...), 'close' (drop the
                              connection) or 'garbage' (malformed response); N times or always
  --sim-crash-after-boot S    the process dies abruptly (exit 1, socket left behind) S s after boot
  --sim-refuse-start          exit 1 at start-up without binding the socket
  --sim-start-delay S         wait S seconds before binding the socket
  --sim-power-off-delay S     after vm.power-button the guest powers off in S s (default 0.2)
  --sim-ignore-power-button   the guest ignores ACPI power-button events
  --sim-journal PATH          append one JSON line per request (method, path, body, fds,
                              status, schema_valid) and one 'start' line with the argv
  --sim-spec PATH             OpenAPI file for body validation (default: $NKUDO_CH_SPEC or the
                              packaged copy); --sim-no-validate turns validation off
  --sim-no-payload-check      do not require --kernel/--firmware files to exist at boot
"""

_SIM_FLOATS = ("boot_delay", "latency", "crash_after_boot", "start_delay", "power_off_delay")
_SIM_LISTS = ("delay", "fail")
_SIM_BOOLS = ("refuse_start", "ignore_power_button", "no_validate", "no_payload_check")
_SIM_PATHS = ("journal", "spec")


class _Stop(Exception):
    """Raised from the SIGTERM/SIGINT handler to leave the serve loop and clean up."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nkudo-ch-sim",
        description="nkudo Cloud Hypervisor simulator (cloud-hypervisor compatible command line; no VM runs).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("-V", "--version", action="store_true", help="print the version and exit")
    p.add_argument("-v", dest="verbose", action="count", default=0, help="more verbose logging (repeatable)")
    p.add_argument("--api-socket", help="path=<path> | fd=<fd> | <path>")
    p.add_argument("--log-file", help="log file (default: stderr)")
    p.add_argument("--log-format", help="accepted for compatibility")
    p.add_argument("--event-monitor", help="path=<path> | fd=<fd>")
    p.add_argument("--restore", help="source_url=file:///dir[,resume=true][,prefault=on][,memory_restore_mode=..]")
    vm = p.add_argument_group("VM configuration (as cloud-hypervisor)")
    for flag in ("kernel", "firmware", "cmdline", "initramfs", "igvm"):
        vm.add_argument(f"--{flag}")
    for flag in ("cpus", "memory", "serial", "console", "rng", "vsock", "balloon", "platform", "tpm",
                 "debug-console", "seccomp", "landlock-rules", "pci-segment", "rate-limit-group"):
        vm.add_argument(f"--{flag}")
    for flag in ("disk", "net", "fs", "pmem", "device", "user-device", "vdpa", "numa", "memory-zone"):
        vm.add_argument(f"--{flag}", nargs="+", action="append")
    for flag in ("pvpanic", "watchdog", "landlock", "no-shutdown", "iommu"):
        vm.add_argument(f"--{flag}", action="store_true")
    sim = p.add_argument_group("simulation (see below)")
    for name in _SIM_FLOATS:
        sim.add_argument("--sim-" + name.replace("_", "-"), type=float, default=None)
    for name in _SIM_LISTS:
        sim.add_argument("--sim-" + name, action="append", default=None)
    for name in _SIM_BOOLS:
        sim.add_argument("--sim-" + name.replace("_", "-"), action="store_true", default=None)
    for name in _SIM_PATHS:
        sim.add_argument("--sim-" + name, default=None)
    return p


def _env_fill(ns: argparse.Namespace) -> None:
    """Fill unset ``--sim-*`` options from ``NKUDO_CH_SIM_*`` variables."""
    env = os.environ
    for name in (*_SIM_FLOATS, *_SIM_LISTS, *_SIM_BOOLS, *_SIM_PATHS):
        attr = "sim_" + name
        raw = env.get("NKUDO_CH_SIM_" + name.upper())
        if getattr(ns, attr) is not None or raw is None or raw == "":
            continue
        if name in _SIM_FLOATS:
            setattr(ns, attr, float(raw))
        elif name in _SIM_LISTS:
            setattr(ns, attr, [x for x in raw.split(",") if x.strip()])
        elif name in _SIM_BOOLS:
            setattr(ns, attr, raw.strip().lower() not in ("0", "false", "no", "off"))
        else:
            setattr(ns, attr, raw)


def sim_options(ns: argparse.Namespace) -> SimOptions:
    opts = SimOptions(
        boot_delay=ns.sim_boot_delay or 0.0,
        latency=ns.sim_latency or 0.0,
        crash_after_boot=ns.sim_crash_after_boot,
        ignore_power_button=bool(ns.sim_ignore_power_button),
        no_shutdown=bool(ns.no_shutdown),
        check_payload_files=not ns.sim_no_payload_check,
    )
    if ns.sim_power_off_delay is not None:
        opts.power_off_delay = ns.sim_power_off_delay
    for item in ns.sim_delay or []:
        call, sep, secs = item.partition("=")
        if not sep:
            raise ValueError(f"--sim-delay expects CALL=SECONDS (got {item!r})")
        opts.delays[call.strip()] = float(secs)
    for item in ns.sim_fail or []:
        call, sep, rest = item.partition("=")
        action, _, count = rest.partition(":")
        action = action.strip().lower()
        if not sep or not (action.isdigit() or action in ("close", "garbage")):
            raise ValueError(f"--sim-fail expects CALL=STATUS|close|garbage[:COUNT] (got {item!r})")
        opts.fail[call.strip()] = (action, int(count) if count else -1)
    return opts


def _socket_path(spec: str) -> tuple[str | None, int | None]:
    if spec.startswith("fd="):
        return None, int(spec[3:])
    if spec.startswith("path="):
        return spec[5:].split(",", 1)[0], None
    return spec, None


class _Log:
    """CH-like log lines (``cloud-hypervisor: <elapsed>: <thread> LEVEL:... -- msg``) to a file or stderr."""

    LEVELS: ClassVar[dict[str, int]] = {"error": 0, "warn": 0, "info": 1, "debug": 2}

    def __init__(self, path: str | None, verbosity: int) -> None:
        self.t0 = time.monotonic()
        self.verbosity = verbosity
        self.out: IO[str] = open(path, "a", encoding="utf-8", buffering=1) if path else sys.stderr

    def __call__(self, level: str, msg: str) -> None:
        if self.LEVELS.get(level, 1) > self.verbosity:
            return
        el = time.monotonic() - self.t0
        self.out.write(f"cloud-hypervisor: {el * 1000:.6f}ms: <vmm> {level.upper()}:nkudo-ch-sim -- {msg}\n")


class _Events:
    """``--event-monitor``: pretty-printed JSON objects like CH's event_monitor."""

    def __init__(self, spec: str | None) -> None:
        self.t0 = time.monotonic()
        self.out: IO[str] | None = None
        if spec:
            if spec.startswith("fd="):
                self.out = os.fdopen(int(spec[3:]), "a", buffering=1, encoding="utf-8")
            else:
                path = spec[5:] if spec.startswith("path=") else spec
                self.out = open(path, "a", encoding="utf-8", buffering=1)

    def __call__(self, source: str, event: str, props: dict[str, Any] | None) -> None:
        if self.out is None:
            return
        el = time.monotonic() - self.t0
        rec = {"timestamp": {"secs": int(el), "nanos": int((el % 1) * 1e9)}, "source": source, "event": event,
               "properties": props}
        try:
            self.out.write(json.dumps(rec, indent=2) + "\n")
        except OSError:
            pass


def _lock(sock_path: str) -> int:
    """Exclusive lock on ``<socket>.lock`` (flock + OFD write lock, like CH v53); fd kept open."""
    fd = os.open(sock_path + ".lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ofd = getattr(fcntl, "F_OFD_SETLK", None)
        if ofd is not None:
            # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid (+pad)
            fcntl.fcntl(fd, ofd, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
    except OSError:
        os.close(fd)
        raise
    return fd


def _refuse(msg: str, status: int = 1) -> int:
    sys.stderr.write(f"Error booting VMM: {msg}\n")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    from nkudo.extras import Extra, require

    if (missing := require(Extra.SIMULATOR, "nkudo-ch-sim")) is not None:
        return missing  # the validator's imports happen later in a thread: say now which extra is missing
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(args)
    if ns.version:
        print(f"cloud-hypervisor {BUILD_VERSION}")
        print("nkudo-ch-sim: the nkudo Cloud Hypervisor simulator (no VM runs)")
        return 0
    _env_fill(ns)
    try:
        opts = sim_options(ns)
    except ValueError as exc:
        parser.error(str(exc))
    payload_given = any(getattr(ns, k) for k in ("kernel", "firmware", "igvm"))
    vm_flags = [f for f in ("cpus", "memory", "disk", "net", "cmdline", "initramfs", "fs", "pmem", "vsock")
                if getattr(ns, f)]
    if vm_flags and not payload_given:
        parser.error(f"the following required arguments were not provided: --kernel <kernel> "
                     f"(--{vm_flags[0]} needs a payload)")
    if ns.sim_refuse_start:
        return _refuse("nkudo-ch-sim: start refused (--sim-refuse-start)")
    cli_config: dict[str, Any] | None = None
    if payload_given:
        try:
            cli_config = cliconfig.build_config(ns)
        except cliconfig.CliError as exc:
            return _refuse(str(exc))
    if not ns.api_socket:
        return _refuse("nkudo-ch-sim needs --api-socket (the simulator has no other interface)")
    sock_path, sock_fd = _socket_path(ns.api_socket)
    os.umask(0o077)
    log = _Log(ns.log_file, ns.verbose)
    events = _Events(ns.event_monitor)
    if ns.sim_start_delay:
        time.sleep(ns.sim_start_delay)

    lock_fd: int | None = None
    if sock_path is not None:
        try:
            lock_fd = _lock(sock_path)
        except BlockingIOError:
            return _refuse(f"Error creating HTTP server: ApiSocketInUse: API socket {sock_path} is in use "
                           "by another Cloud Hypervisor instance")
        except OSError as exc:
            return _refuse(f"Error creating HTTP server: {exc}")
        try:
            os.unlink(sock_path)  # stale socket from a crashed run: we hold the lock
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(sock_path)
        except OSError as exc:
            return _refuse(f"Error creating HTTP server: {exc}")
        listener.listen(128)
    else:
        listener = socket.socket(fileno=sock_fd)

    from nkudo.chsim.schema import LazySpec, default_spec_path
    from nkudo.chsim.server import Server

    spec_path = None if ns.sim_no_validate else Path(ns.sim_spec) if ns.sim_spec else default_spec_path()
    if spec_path is not None and not spec_path.is_file():
        log("warn", f"OpenAPI spec {spec_path} not found: request bodies are NOT validated")
        spec_path = None
    spec = LazySpec(spec_path)
    spec.preload()

    journal: IO[str] | None = None
    if ns.sim_journal:
        journal = open(ns.sim_journal, "a", encoding="utf-8")
        journal.write(json.dumps({"kind": "start", "ts": round(time.time(), 6), "pid": os.getpid(), "argv": args,
                                  "config": cli_config, "spec": str(spec_path) if spec_path else None}) + "\n")
        journal.flush()

    serial = None
    if cli_config is not None and (cli_config.get("serial") or {}).get("mode") == "File":
        serial = cli_config["serial"]["file"]
    vmm = Vmm(opts, emit=events, log=log, serial_path=serial)
    events("vmm", "starting", None)
    log("info", f"nkudo-ch-sim {BUILD_VERSION} serving {ns.api_socket} (pid {os.getpid()})")

    def _on_signal(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise _Stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    status = 0
    try:
        try:
            if ns.restore:
                r = cliconfig.split_options(ns.restore)
                vmm.do_vm_restore({"source_url": r.get("source_url", ""),
                                   "resume": r.get("resume", "false") in ("true", "on")}, 0)
            elif cli_config is not None:
                vmm.config = cli_config
                vmm.emit("vm", "created", None)
                vmm.boot()
        except ApiFailure as exc:
            sys.stderr.write("Error booting VM: " + ": ".join(exc.chain or []) + "\n")
            status = 1
        else:
            server = Server(listener, vmm, opts, spec, journal, log)
            status = server.serve()
    except _Stop:
        log("info", "received termination signal: shutting down the VMM")
        status = 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        events("vmm", "shutdown", None)
        listener.close()
        if sock_path is not None:
            try:
                os.unlink(sock_path)
            except FileNotFoundError:
                pass
        if lock_fd is not None:
            os.close(lock_fd)
        if journal is not None:
            journal.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
