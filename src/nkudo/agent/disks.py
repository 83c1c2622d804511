"""Root disks: copy-on-write clones of a base image, grown on request.

Reflink (``FICLONE``) where the filesystem supports it (btrfs, XFS): instant
and space-free. Elsewhere a sparse copy: only data extents are copied
(``SEEK_DATA``/``SEEK_HOLE``), so a mostly empty 10 GiB image costs what it
holds. The clone is written to a temporary name and renamed, so a crash never
leaves a half-copied disk under the final name.
"""

from __future__ import annotations

import errno
import fcntl
import os

FICLONE = 0x40049409
CHUNK = 1 << 20


def _sparse_copy(src_fd: int, dst_fd: int, size: int) -> None:
    off = 0
    while off < size:
        try:
            data = os.lseek(src_fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        hole = os.lseek(src_fd, data, os.SEEK_HOLE)
        pos = data
        while pos < hole:
            n = min(CHUNK, hole - pos)
            buf = os.pread(src_fd, n, pos)
            if not buf:
                break
            if buf.count(0) != len(buf):  # keep zero blocks sparse too
                os.pwrite(dst_fd, buf, pos)
            pos += len(buf)
        off = hole


def clone_image(src: str, dst: str, grow_to_bytes: int | None = None) -> str:
    """Clone ``src`` to ``dst`` (atomically); return the method used: reflink or sparse."""
    tmp = f"{dst}.partial"
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(src_fd).st_size
        dst_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.ioctl(dst_fd, FICLONE, src_fd)
                method = "reflink"
            except OSError:
                os.ftruncate(dst_fd, size)
                _sparse_copy(src_fd, dst_fd, size)
                method = "sparse"
            if grow_to_bytes is not None and grow_to_bytes > size:
                os.ftruncate(dst_fd, grow_to_bytes)
            os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    os.rename(tmp, dst)
    fsync_dir(os.path.dirname(dst))
    return method


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """write-temp + fsync + rename + directory fsync."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
