"""CH API client cost per request, against a real simulator in another process.

Gate: client-side CPU time (``time.thread_time`` in this process) of the native
transport is at most one third of ``http.client``'s (an ``HTTPConnection``
subclass over AF_UNIX doing the same ``GET /api/v1/vmm.ping``). Round-trip
time is reported against the raw-socket floor (hand-written send/recv of the
same bytes). Both sides are measured in the same run, interleaved.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.chsim.simproc import Sim

from benchmarks.conftest import GateRunFailed, checked, interleaved, record_gate
from nkudo import _native
from nkudo.chapi import ChClient, codec

REQ = codec.build_request("GET", "vmm.ping")


class UnixHTTPConnection(http.client.HTTPConnection):
    """The stdlib baseline: http.client over the API socket."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


@pytest.fixture(scope="module")
def sim_socket() -> Iterator[str]:
    d = Path(tempfile.mkdtemp(prefix="chb-", dir="/tmp"))
    sim = Sim(d, "--sim-no-validate", journal=False)
    try:
        yield sim.socket
    finally:
        sim.kill()
        shutil.rmtree(d, ignore_errors=True)


def _callables(path: str) -> dict[str, Callable[[], object]]:
    if _native.load("chapi") is None:
        pytest.fail(f"native chapi not loaded: {_native.reason('chapi')}")
    native = ChClient(path, transport="native")
    python = ChClient(path, transport="python")
    expected_len = len(codec.build_request("GET", "vmm.ping"))
    assert expected_len
    ref = native.request("GET", "vmm.ping")
    total = len(b"HTTP/1.1 200 \r\n") + sum(len(k) + len(v) + 4 for k, v in ref.headers) + 2 + len(ref.body)

    def http_client() -> object:
        conn = UnixHTTPConnection(path)
        conn.request("GET", "/api/v1/vmm.ping", headers={"Accept": "*/*"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if resp.status != 200 or not body:
            raise GateRunFailed(f"http.client vmm.ping answered {resp.status}: {body[:200]!r}")
        return body

    def raw_floor() -> object:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(REQ)
        got = 0
        while got < total:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += len(chunk)
        s.close()
        return got

    def ok(r: codec.Response) -> bool:
        return r.status == 200 and bool(r.body)

    return {
        "native": checked(lambda: native.request("GET", "vmm.ping"), ok, "native vmm.ping"),
        "python": checked(lambda: python.request("GET", "vmm.ping"), ok, "python vmm.ping"),
        "http_client": http_client,
        "raw_floor": checked(raw_floor, lambda got: got >= total, "raw vmm.ping round trip"),
    }


def _cpu_per_call(fns: dict[str, Callable[[], object]], *, rounds: int, per_round: int) -> dict[str, float]:
    """Lowest per-round client-thread CPU seconds per call, measured round-robin.

    The minimum, not the median: CPU time only grows with interference (cache and
    scheduler noise from other load on a 2-core host), so the lowest round of each
    side is the best estimate of its own cost, and both sides get the same treatment.
    """
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(20):
            fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.thread_time()
            for _ in range(per_round):
                fn()
            samples[k].append((time.thread_time() - t0) / per_round)
    return {k: min(v) for k, v in samples.items()}


def test_cpu_native_vs_http_client(sim_socket: str) -> None:
    fns = _callables(sim_socket)
    cpu = _cpu_per_call(fns, rounds=40, per_round=100)
    us = {k: round(v * 1e6, 2) for k, v in cpu.items()}
    ratio = cpu["native"] / cpu["http_client"]
    record_gate(
        "chapi_client_cpu_per_request",
        native_us=us["native"], python_us=us["python"], http_client_us=us["http_client"],
        raw_floor_us=us["raw_floor"], native_over_http_client=round(ratio, 3), limit=round(1 / 3, 3),
        command="pytest -q benchmarks/test_chapi_bench.py",
    )
    assert ratio <= 1 / 3, us


def test_rtt_against_raw_floor(sim_socket: str) -> None:
    fns = _callables(sim_socket)
    res = interleaved(fns, rounds=1500)
    med = {k: round(v["median"] * 1e6, 1) for k, v in res.items()}
    record_gate(
        "chapi_rtt",
        native_us=med["native"], python_us=med["python"], http_client_us=med["http_client"],
        raw_floor_us=med["raw_floor"], native_over_floor=round(med["native"] / med["raw_floor"], 3),
        http_client_over_floor=round(med["http_client"] / med["raw_floor"], 3),
        command="pytest -q benchmarks/test_chapi_bench.py",
    )
    # Reported, not gated tightly: the server (a Python process) dominates the round trip.
    assert med["native"] <= med["http_client"]
