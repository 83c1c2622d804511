"""CH API client cost per request, against a real simulator in another process.

Gate: client-side CPU time (``time.thread_time`` in this process) of the native
transport is at most one third of ``http.client``'s (an ``HTTPConnection``
subclass over AF_UNIX doing the same ``GET /api/v1/vmm.ping``). Round-trip
time is reported against the raw-socket floor (hand-written send/recv of the
same bytes). All sides are measured in the same run, interleaved: the fixture
times the native client, the others are timed between its rounds with the
fixture's clock (``time_sides``).
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

from benchmarks.conftest import Benchmark, GateRunFailed, checked, record, time_sides
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


PER_ROUND = 100


def _batch(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        for _ in range(PER_ROUND):
            fn()

    return run


@pytest.mark.benchmark(timer=time.thread_time)
def test_cpu_native_vs_http_client(sim_socket: str, benchmark: Benchmark) -> None:
    """Gate: native client CPU per request <= 1/3 of http.client's.

    Timed with the client thread's CPU clock (``time.thread_time``, set by the
    ``benchmark`` mark), 40 rounds of 100 requests per side. Compared on the
    lowest round, not the median: CPU time only grows with interference (cache
    and scheduler noise from other load on a 2-core host), so the lowest round
    of each side is the best estimate of its own cost, and every side gets the
    same treatment.
    """
    fns = _callables(sim_socket)
    res = time_sides(
        benchmark, {k: _batch(fn) for k, fn in fns.items()}, primary="native", rounds=40, warmup_rounds=1,
        per_call=PER_ROUND,
    )  # fmt: skip
    us = {k: round(v.min * 1e6, 2) for k, v in res.items()}
    ratio = res["native"].min / res["http_client"].min
    record(
        benchmark,
        "chapi_client_cpu_per_request",
        native_us=us["native"], python_us=us["python"], http_client_us=us["http_client"],
        raw_floor_us=us["raw_floor"], native_over_http_client=round(ratio, 3), limit=round(1 / 3, 3),
    )  # fmt: skip
    assert ratio <= 1 / 3, us


def test_rtt_against_raw_floor(sim_socket: str, benchmark: Benchmark) -> None:
    """Round trip per request, median of 1500 interleaved rounds; native must not be slower than http.client."""
    fns = _callables(sim_socket)
    res = time_sides(benchmark, fns, primary="native", rounds=1500)
    med = {k: v.median_us for k, v in res.items()}
    record(
        benchmark,
        "chapi_rtt",
        native_us=med["native"], python_us=med["python"], http_client_us=med["http_client"],
        raw_floor_us=med["raw_floor"], native_over_floor=round(med["native"] / med["raw_floor"], 3),
        http_client_over_floor=round(med["http_client"] / med["raw_floor"], 3),
    )  # fmt: skip
    # Reported, not gated tightly: the server (a Python process) dominates the round trip.
    assert med["native"] <= med["http_client"]
