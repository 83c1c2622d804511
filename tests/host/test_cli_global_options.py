"""Issue 10 items 12 and 13: global options after the command, and no state before the enrollment check.

Real ``nkudo-edge`` processes. The "enrolled" host is a real state database and real
credentials (a self-signed certificate) pointing at a control plane that is not
there (127.0.0.1:1), so every agent command reaches its first network call and
fails there, predictably, after having read the state directory it was given.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nkudo.agent.identity import Identity, Pki, save_identity
from nkudo.agent.state import StateStore

EDGE = str(Path(sys.executable).parent / "nkudo-edge")
AGENT_ID = "11111111-2222-4333-8444-555555555555"


def edge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NKUDO_")}
    full_env.update(env or {})
    return subprocess.run(
        [EDGE, *args], capture_output=True, text=True, env=full_env, timeout=60, check=False
    )


def _self_signed(pki: Pki) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, AGENT_ID)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256())
    )  # fmt: skip
    pem = cert.public_bytes(serialization.Encoding.PEM)
    pki.write(pki.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))  # fmt: skip
    pki.write(pki.cert, pem)
    pki.write(pki.ca, pem)
    pki.write(pki.refresh, b"refresh-token-for-tests")


def make_enrolled(root: Path) -> None:
    """A host enrolled with a control plane that does not answer (fresh each call, same paths)."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    pki = Pki(str(root / "pki"))
    _self_signed(pki)
    store = StateStore(str(root / "state"))
    ident = Identity(agent_id=AGENT_ID, tenant_id="t", site_id="s", host_id="h",
                     control_plane="https://127.0.0.1:1", hostname="edge-test", enrolled_at=now_iso())  # fmt: skip
    ident.record_cert((root / "pki" / "agent.crt").read_bytes())
    save_identity(store, ident)
    store.close()
    (root / "plan.json").write_text(json.dumps([{"action_id": "a1", "type": "CommandExecute",
                                                 "params": {"command": "/bin/true"}}]))  # fmt: skip


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _agent_dirs(root: Path) -> list[str]:
    return [
        "--runtime-dir",
        str(root / "vms"),
        "--snapshot-dir",
        str(root / "snaps"),
        "--metrics-addr",
        "off",
    ]


#: One invocation per command: its own arguments (``{root}`` is replaced).
COMMANDS: dict[str, list[str]] = {
    "version": ["--json"],
    "check": ["--json", "--skip", "kvm", "--skip", "disk", "--skip", "memory", "--bridge", "nonexist0"],
    "hostfacts": [],
    "enroll": ["--json", "--control-plane", "https://127.0.0.1:1", "--token", "tok", "--pki-dir", "{root}/pki"],
    "run": ["--once", "--pki-dir", "{root}/pki", "--runtime-dir", "{root}/vms", "--snapshot-dir", "{root}/snaps",
            "--metrics-addr", "off", "--max-backoff", "0.1"],
    "status": ["--json", "--pki-dir", "{root}/pki"],
    "unenroll": ["--json", "--yes", "--pki-dir", "{root}/pki", "--runtime-dir", "{root}/vms",
                 "--snapshot-dir", "{root}/snaps"],
    "renew": ["--json", "--force", "--pki-dir", "{root}/pki"],
    "verify-heartbeat": ["--json", "--pki-dir", "{root}/pki"],
    "apply": ["--json", "--plan", "{root}/plan.json", "--exec-allow", "/bin/true", "--runtime-dir", "{root}/vms",
              "--snapshot-dir", "{root}/snaps"],
}  # fmt: skip


def _normal(cmd: str, out: str) -> Any:
    """The parts of a command's output that do not change from one run to the next."""
    if not out.strip():
        return None
    doc = json.loads(out)
    if cmd == "check":
        return {c["id"]: (c["status"], c["data"].get("path")) for c in doc["checks"]}
    if cmd == "hostfacts":
        return [d["path"] for d in doc["disks"]]
    if cmd == "apply":
        return [(o["action_id"], o["status"]) for o in doc["outcomes"]]
    if cmd == "status":
        return {k: doc[k] for k in ("enrolled", "agent_id", "control_plane")}
    if cmd in ("verify-heartbeat", "renew", "unenroll", "enroll"):
        return doc.get("error", {}).get("code")
    return doc


def _log_lines(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_global_options_after_the_command(cmd: str, tmp_path: Path) -> None:
    """Issue 10 item 13: --log-format, --log-level and --state-dir were usage errors after the command."""
    root = tmp_path / "h"
    args = [a.replace("{root}", str(root)) for a in COMMANDS[cmd]]
    glob = ["--log-format", "json", "--log-level", "warn", "--state-dir", str(root / "state")]
    results = []
    for argv in ([*glob, cmd, *args], [cmd, *args, *glob], [cmd, *glob[:2], *args, *glob[2:]]):
        make_enrolled(root)
        r = edge(*argv)
        assert r.returncode != 2, (argv, r.stderr)
        lines = [(str(x["level"]), str(x["msg"])) for x in _log_lines(r.stderr)]
        results.append((r.returncode, _normal(cmd, r.stdout), lines))
    assert results[0] == results[1] == results[2], results
    rc, out, logs = results[0]
    # Each command really used the state directory given (an enrolled host) and the log options.
    expected = {
        "status": {"enrolled": True, "agent_id": AGENT_ID, "control_plane": "https://127.0.0.1:1"},
        "enroll": "ALREADY_ENROLLED",
        "renew": "CP_UNREACHABLE",
        "unenroll": "CP_UNREACHABLE",
        "verify-heartbeat": "CP_UNREACHABLE",
    }
    if cmd in expected:
        assert out == expected[cmd]
    if cmd == "hostfacts":
        assert str(root / "state") in out
    if cmd == "check":
        assert out["state_dir"] == ("pass", str(root / "state"))
    if cmd == "apply":
        assert rc == 0 and out == [("a1", "SUCCEEDED")]
    if cmd == "run":
        # --log-level warn hides "agent starting" (info); the unreachable warning is a JSON line.
        assert rc == 0
        assert ("WARN", "control plane unreachable; backing off") in [(lv.upper(), m) for lv, m in logs], logs
        assert not any(m == "agent starting" for _, m in logs)


def test_later_global_option_wins_and_env_still_works(tmp_path: Path) -> None:
    """Issue 10 item 13: given before and after the command, the later wins; NKUDO_* keep working."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_enrolled(b)
    r = edge("--state-dir", str(a), "status", "--state-dir", str(b / "state"), "--json")  # click path
    assert json.loads(r.stdout)["agent_id"] == AGENT_ID, r.stdout
    r = edge("--state-dir", str(a), "hostfacts", "--state-dir", str(b / "state"))
    assert str(b / "state") in r.stdout and str(a) not in r.stdout, r.stdout
    r = edge("status", "--json", env={"NKUDO_STATE_DIR": str(b / "state")})
    assert json.loads(r.stdout)["agent_id"] == AGENT_ID
    # fast path (run): environment for the log format, state directory after the command
    run = ["run", "--once", "--pki-dir", str(b / "pki"), *_agent_dirs(b), "--max-backoff", "0.1"]
    r = edge("--state-dir", str(a), *run, "--state-dir", str(b / "state"), env={"NKUDO_LOG_FORMAT": "json"})
    assert r.returncode == 0, r.stderr
    assert any(x["msg"] == "agent starting" for x in _log_lines(r.stderr)), r.stderr
    assert not a.exists()
    r = edge(*run, "--state-dir", str(b / "state"), "--log-level", "error", env={"NKUDO_LOG_FORMAT": "json"})
    assert r.returncode == 0 and _log_lines(r.stderr) == [], r.stderr


def test_fast_path_takes_global_options_after_the_command() -> None:
    """Issue 10 item 13: the start-up fast path (version, check, run) parses them itself, not via click."""
    from nkudo.cli.options import fast_parse

    for argv in (["version", "--log-format", "json"], ["check", "--json", "--log-level=debug"],
                 ["run", "--log-level", "debug", "--state-dir", "/x", "--once"]):  # fmt: skip
        got = fast_parse(argv)
        assert got is not None, argv
    got = fast_parse(["--log-level", "error", "--state-dir", "/a", "run", "--state-dir", "/b"])
    assert got is not None and got[1]["state_dir"] == "/b" and got[1]["log_level"] == "error"
    assert fast_parse(["run", "--log-level", "loud"]) is None  # invalid: click reports it


@pytest.mark.parametrize("cmd", ["run", "renew", "verify-heartbeat", "unenroll", "status"])
def test_not_enrolled_creates_nothing(cmd: str, tmp_path: Path) -> None:
    """Issue 10 item 12: `run` (and renew, verify-heartbeat, unenroll) created the state directory,
    its database and the VM/snapshot directories before finding that the host is not enrolled."""
    root = tmp_path / "fresh"
    args = {"run": _agent_dirs(root), "unenroll": ["--yes", *_agent_dirs(root)[:4]]}.get(cmd, [])
    r = edge("--state-dir", str(root / "state"), cmd, "--pki-dir", str(root / "pki"), *args)
    assert r.returncode == 1, r.stderr
    assert "not enrolled" in (r.stderr + r.stdout)
    assert not root.exists(), sorted(str(p) for p in root.rglob("*"))


def test_not_enrolled_after_unenroll_leaves_state_unchanged(tmp_path: Path) -> None:
    """Issue 10 item 12: a state database without identity (after unenroll) gets no new VM directories."""
    root = tmp_path / "h"
    make_enrolled(root)
    shutil.rmtree(root / "pki")
    before = sorted(p.name for p in root.iterdir())
    r = edge("--state-dir", str(root / "state"), "run", "--pki-dir", str(root / "pki"), *_agent_dirs(root))
    assert r.returncode == 1 and "NOT_ENROLLED" in r.stderr
    assert sorted(p.name for p in root.iterdir()) == before
