"""Disk clones, the cloud-init seed image and path confinement, on the real filesystem."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nkudo.agent import paths as P
from nkudo.agent.disks import clone_image
from nkudo.agent.seed import build_seed_iso, read_seed_iso, write_seed_iso
from nkudo.errors import NkudoError, ValidationError


def test_sparse_clone_preserves_content_and_holes(tmp_path: Path) -> None:
    src = tmp_path / "base.img"
    with open(src, "wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.seek(1024 * 1024)
        f.write(b"A" * 4096)
        f.seek(40 * 1024 * 1024)
        f.write(b"B" * 8192)
    dst = tmp_path / "root.img"
    method = clone_image(str(src), str(dst), grow_to_bytes=128 * 1024 * 1024)
    assert method in ("reflink", "sparse")
    assert dst.stat().st_size == 128 * 1024 * 1024
    with open(dst, "rb") as f:
        f.seek(1024 * 1024)
        assert f.read(4096) == b"A" * 4096
        f.seek(40 * 1024 * 1024)
        assert f.read(8192) == b"B" * 8192
        f.seek(0)
        assert f.read(4096) == b"\0" * 4096
    assert dst.stat().st_blocks * 512 < 4 * 1024 * 1024  # holes stayed holes
    assert not (tmp_path / "root.img.partial").exists()
    assert oct(dst.stat().st_mode & 0o777) == "0o600"


def test_seed_iso_is_a_cidata_volume(tmp_path: Path) -> None:
    iso = tmp_path / "seed.iso"
    n = write_seed_iso(str(iso), "#cloud-config\nhostname: web\n", "instance-id: vm-1\n", "version: 2\n")
    assert n == iso.stat().st_size
    out = subprocess.run(
        ["blkid", "-o", "export", str(iso)], capture_output=True, text=True, check=True
    ).stdout
    assert "LABEL=cidata" in out and "TYPE=iso9660" in out
    files = read_seed_iso(iso.read_bytes())
    assert files == {
        "user-data": "#cloud-config\nhostname: web\n",
        "meta-data": "instance-id: vm-1\n",
        "network-config": "version: 2\n",
    }
    assert build_seed_iso("a", "b") == build_seed_iso("a", "b")  # deterministic
    assert "network-config" not in read_seed_iso(build_seed_iso("a", "b"))


def test_safe_join_confines_paths(tmp_path: Path) -> None:
    root = tmp_path / "vms"
    root.mkdir()
    assert P.safe_join(str(root), "vm-1") == os.path.join(os.path.realpath(root), "vm-1")
    for bad in ("..", ".", "a/b", "", "../etc"):
        with pytest.raises(ValidationError):
            P.safe_join(str(root), bad)
    (root / "evil").symlink_to("/etc")
    with pytest.raises(NkudoError) as ei:
        P.safe_join(str(root), "evil")
    assert ei.value.code == "PATH_ESCAPE"


def test_within_roots(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "vmlinux").write_text("k")
    (images / "link").symlink_to("/etc/hostname")
    assert P.within_roots(str(images / "vmlinux"), (str(images),), "params.kernel_path").endswith("vmlinux")
    with pytest.raises(NkudoError) as ei:
        P.within_roots("/etc/hostname", (str(images),), "params.kernel_path")
    assert ei.value.code == "PATH_NOT_ALLOWED" and ei.value.field == "params.kernel_path"
    with pytest.raises(NkudoError) as ei:
        P.within_roots(str(images / "link"), (str(images),), "params.kernel_path")
    assert ei.value.code == "PATH_NOT_ALLOWED"  # a symlink out of the root does not count
    with pytest.raises(NkudoError) as ei:
        P.within_roots(str(images / "missing"), (str(images),), "params.image_path")
    assert ei.value.code == "FILE_NOT_FOUND"


def test_socket_path_length_is_checked() -> None:
    with pytest.raises(NkudoError) as ei:
        P.check_socket_path("/" + "x" * 120)
    assert ei.value.code == "PATH_TOO_LONG"
