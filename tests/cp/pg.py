"""A throwaway PostgreSQL cluster for tests and benchmarks (initdb + pg_ctl, unix socket only).

Why not a container: CI runs on a plain Debian machine (see
scripts/ci-postgres.sh) and the binaries are there; a private cluster on a
private socket directory cannot collide with anything else on the host.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    root: Path
    port: int
    user: str
    run_as: list[str]

    def url(self, db: str) -> str:
        return f"postgresql://{self.user}@/{db}?host={self.root / 'sock'}&port={self.port}"

    def create_database(self, name: str | None = None) -> str:
        import psycopg

        name = name or f"nkudo_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run([*self.run_as, find_bin("pg_ctl") or "pg_ctl", "-D", str(self.root / "data"), "-m", "immediate",
                        "stop"], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(*, durable: bool = False) -> Cluster:
    """initdb + start on a free port with a private socket dir. Runs as ``postgres`` when we are root."""
    initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found; run scripts/ci-postgres.sh")
    root = Path(tempfile.mkdtemp(prefix="nkudo-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise RuntimeError("running as root and no 'postgres' user exists to run initdb") from exc
        os.chown(root, pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    (root / "sock").mkdir()
    if run_as:
        shutil.chown(root / "sock", "postgres", "postgres")
    user = "nkudo"
    subprocess.run([*run_as, initdb, "-D", str(root / "data"), "-A", "trust", "-U", user, "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True)
    port = free_port()
    opts = f"-p {port} -k {root / 'sock'} -c listen_addresses='' -c max_connections=200 -c shared_buffers=128MB"
    if not durable:
        opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    r = subprocess.run([*run_as, pg_ctl, "-D", str(root / "data"), "-o", opts, "-l", str(root / "log"), "-w",
                        "-t", "30", "start"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        raise RuntimeError(f"pg_ctl start failed: {r.stderr}\n{log}")
    return Cluster(root=root, port=port, user=user, run_as=run_as)
