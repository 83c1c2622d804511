"""Issue 11 (one native loader): ``nkudo._native`` loads every native module or its twin the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nkudo import _native
from tests.conftest import require_native

EDGE = str(Path(sys.executable).parent / "nkudo-edge")
NAMES = sorted(_native.MODULES)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NKUDO_")}
    env.update(extra)
    return env


def _python(code: str, **extra: str) -> str:
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_env(**extra),
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("name", NAMES)
def test_native_and_twin_expose_the_same_public_names(name: str) -> None:
    """Issue 11 item 'one loader': each registered module's twin is a drop-in for its public names."""
    require_native(name)
    native = _native.public_names(name, _native.require(name))
    twin = _native.public_names(name, _native.twin(name))
    assert native, f"{name}: the native module exposes nothing"
    assert native == twin
    if _native.MODULES[name].surface == "module":
        assert all(callable(getattr(_native.twin(name), n)) for n in twin)


@pytest.mark.parametrize("name", NAMES)
def test_binding_follows_the_preference(name: str) -> None:
    """Issue 11: ``binding(name, native)`` answers None/True/False the same way for every module."""
    require_native(name)
    assert _native.binding(name).native is True
    assert _native.binding(name, True).module is _native.require(name)
    twin = _native.binding(name, False)
    assert twin.native is False and twin.module.__name__ == _native.MODULES[name].twin


def test_disabled_gives_every_twin_with_one_reason() -> None:
    """Issue 11: ``NKUDO_NATIVE=0`` gives the twin for all modules, with the same recorded reason."""
    code = (
        "import json; from nkudo import _native\n"
        "out = {}\n"
        "for n in _native.MODULES:\n"
        "    b = _native.binding(n)\n"
        "    out[n] = [b.native, b.module.__name__, b.reason, _native.reason(n)]\n"
        "print(json.dumps(out))\n"
    )
    got = json.loads(_python(code, NKUDO_NATIVE="0"))
    assert sorted(got) == NAMES
    for name, (native, module, why, recorded) in got.items():
        assert native is False, name
        assert module == _native.MODULES[name].twin, name
        assert why == recorded == "disabled by NKUDO_NATIVE=0", name


def test_demanding_native_when_disabled_raises_one_error_for_all() -> None:
    """Issue 11: ``native=True`` raises ``NativeUnavailable`` (with the reason) for every module and caller.

    Before the loader, ``host.syscalls`` silently fell back to its twin, ``kvm``
    and ``proc`` raised bare RuntimeErrors worded differently.
    """
    code = (
        "import json, os\n"
        "from nkudo import _native\n"
        "from nkudo.host import kvm, syscalls\n"
        "from nkudo.proc import pidfd_sys\n"
        "calls = {\n"
        "    'kvm': lambda: kvm.raw_probe('/dev/null', [], False, native=True),\n"
        "    'syscalls': lambda: syscalls.cap_effective(native=True),\n"
        "    'pidfd': lambda: pidfd_sys.proc_start_time(os.getpid(), native=True),\n"
        "}\n"
        "for n in _native.MODULES:\n"
        "    calls.setdefault(n, lambda n=n: _native.binding(n, True))\n"
        "out = {}\n"
        "for n, call in calls.items():\n"
        "    try:\n"
        "        call()\n"
        "        out[n] = None\n"
        "    except _native.NativeUnavailable as exc:\n"
        "        out[n] = [exc.name, exc.reason, str(exc)]\n"
        "print(json.dumps(out))\n"
    )
    got = json.loads(_python(code, NKUDO_NATIVE="0"))
    assert sorted(got) == NAMES
    for name, err in got.items():
        assert err == [
            name,
            "disabled by NKUDO_NATIVE=0",
            f"native module {name!r} unavailable: disabled by NKUDO_NATIVE=0",
        ], name


def test_domain_errors_keep_their_codes_when_native_is_demanded() -> None:
    """Issue 11: the CH transport and the network backend still answer with their own error types."""
    code = (
        "from nkudo.chapi.errors import ChTransportError\n"
        "from nkudo.chapi.transport import resolve\n"
        "from nkudo.net.errors import NetError\n"
        "from nkudo.net.hostnet import open_backend\n"
        "try:\n"
        "    resolve('native')\n"
        "except ChTransportError as exc:\n"
        "    print(exc)\n"
        "try:\n"
        "    open_backend('native')\n"
        "except NetError as exc:\n"
        "    print(exc.code, exc)\n"
        "print(resolve(None)[0], open_backend('auto').backend)\n"
    )
    lines = _python(code, NKUDO_NATIVE="0").splitlines()
    assert lines[0].endswith("native CH API transport unavailable: disabled by NKUDO_NATIVE=0")
    code, _, message = lines[1].partition(" ")
    assert code == "NET_BACKEND_UNAVAILABLE"
    assert message.endswith("native netlink module unavailable: disabled by NKUDO_NATIVE=0")
    assert lines[2] == "python twin"


@pytest.mark.parametrize("disabled", [False, True])
def test_version_lists_every_module(disabled: bool) -> None:
    """Issue 11: ``nkudo-edge version --json`` reports every registered module, native or twin."""
    env = _env(NKUDO_NATIVE="0") if disabled else _env()
    r = subprocess.run(
        [EDGE, "version", "--json"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    mods = {m["name"]: m for m in json.loads(r.stdout)["native_modules"]}
    assert sorted(mods) == NAMES
    for name, m in mods.items():
        assert m["module"] == _native.MODULES[name].native
        if disabled:
            assert m["native"] is False and m["reason"] == "disabled by NKUDO_NATIVE=0"
        else:
            require_native(name)
            assert m["native"] is True and m["reason"] == "native" and str(m["file"]).endswith(".so")
