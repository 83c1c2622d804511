"""The path parameters both front ends read (``nkudo.cp.pathparams``): one pattern, one 404."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from nkudo.cp.errors import NotFound
from nkudo.cp.pathparams import path_uuid, vm_path_id

UUID = "0b4f6a52-2f0e-4a3e-9d7c-1c2b3a4d5e6f"


def _req(**match: str):  # type: ignore[no-untyped-def]
    return make_mocked_request("GET", "/", match_info=match)


@pytest.mark.parametrize("bad", ["", "nope", UUID + "\n", UUID.upper() + "x", "../" + UUID])
def test_a_malformed_uuid_is_the_404_of_an_unknown_object(bad: str) -> None:
    """A trailing newline (``$`` would accept it) or any other shape names nothing: 404, never a lookup."""
    with pytest.raises(NotFound) as e:
        path_uuid(_req(site_id=bad), "site_id")
    assert (e.value.code, e.value.message) == ("SITE_NOT_FOUND", "site not found")


def test_a_uuid_passes_unchanged() -> None:
    assert path_uuid(_req(plan_id=UUID), "plan_id") == UUID


@pytest.mark.parametrize("bad", ["", "vm\n", "../x", "vm x", "vm\x00", "vm-é", "a" * 65])
def test_a_malformed_vm_id_is_the_404_of_an_unknown_vm(bad: str) -> None:
    with pytest.raises(NotFound) as e:
        vm_path_id(_req(vm_id=bad))
    assert e.value.code == "VM_NOT_FOUND"


def test_a_vm_id_passes_unchanged() -> None:
    assert vm_path_id(_req(vm_id="vm-a.1_b")) == "vm-a.1_b"
