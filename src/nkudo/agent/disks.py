"""Root disks: copy-on-write clones of a base image, grown on request.

Reflink (``FICLONE``) where the filesystem supports it (btrfs, XFS): instant
and space-free. Elsewhere a sparse copy: only data extents are copied
(``SEEK_DATA``/``SEEK_HOLE``), so a mostly empty 10 GiB image costs what it
holds. The clone is written to a temporary name and renamed, so a crash never
leaves a half-copied disk under the final name, and a failed clone removes
its ``.partial`` at once.

Before anything is copied, :func:`check_room` proves the clone can exist at
all (issue 10 item 9): the filesystem must accept a file of the requested
size (``DISK_TOO_LARGE`` otherwise) and must have room for the base image's
data (``INSUFFICIENT_SPACE``), so an oversized or doomed request fails fast
with a code naming the field instead of a half-written copy and
``File too large``.
"""

from __future__ import annotations

import errno
import fcntl
import os

from nkudo.errors import NkudoError
from nkudo.wire.vocab import ErrorCode

FICLONE = 0x40049409
CHUNK = 1 << 20
#: Free space required on top of the base image's data: room for the seed image, the VMM's logs and
#: filesystem metadata, so a create that passes the check does not run the filesystem out by itself.
SPACE_RESERVE = 16 * 1024 * 1024
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_TOO_BIG = (errno.EFBIG, errno.EINVAL)  # ftruncate past the filesystem's maximum file size


def os_failure(exc: OSError, what: str, *, field: str | None = None) -> NkudoError:
    """Map a host filesystem error of a create step to a stable code (never ``INTERNAL``)."""
    reason = exc.strerror or str(exc)
    if exc.errno in _NO_SPACE:
        return NkudoError(
            f"{what}: the filesystem is full ({reason})", code=ErrorCode.INSUFFICIENT_SPACE, field=field
        )
    if exc.errno == errno.EFBIG:
        return NkudoError(f"{what}: {reason}", code=ErrorCode.DISK_TOO_LARGE, field=field)
    return NkudoError(f"{what}: {reason}", code=ErrorCode.HOST_IO_ERROR, field=field)


def _probe_size(directory: str, size: int) -> None:
    """Raise ``OSError(EFBIG)`` if ``directory``'s filesystem cannot hold a ``size``-byte file.

    ``PC_FILESIZEBITS`` says 64 on ext4 although ext4 stops at 16 TiB, so the only
    reliable test is the kernel's own: extend an anonymous (``O_TMPFILE``) file to
    ``size``. It stays sparse, costs no space and vanishes on close.
    """
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        name = None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        name = os.path.join(directory, f".size-probe-{os.getpid()}")
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            if exc.errno in _TOO_BIG:
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), directory) from None
            raise
    finally:
        os.close(fd)
        if name is not None:
            os.unlink(name)


def check_room(
    src: str,
    dst_dir: str,
    grow_to_bytes: int | None,
    *,
    size_field: str = "params.disk_size_gib",
    image_field: str = "params.image_path",
) -> None:
    """Refuse, before copying, a clone the filesystem under ``dst_dir`` cannot hold.

    Size: the clone's final size (the larger of the base image and ``grow_to_bytes``)
    must be a legal file size there (``DISK_TOO_LARGE``, naming ``size_field``).

    Space: root disks are thin (reflink or sparse clones), so the grown size is *not*
    reserved up front; what the copy itself needs is the base image's allocated data.
    "Enough" means that plus :data:`SPACE_RESERVE` free for an unprivileged writer
    (``f_bavail``), else ``INSUFFICIENT_SPACE`` naming ``image_field``. On a reflink
    filesystem the clone would cost nothing; being conservative there only refuses
    creates on a filesystem that is within the reserve of full anyway.
    """
    try:
        st = os.stat(src)
    except OSError as exc:
        raise os_failure(exc, f"{image_field}: cannot read base image {src!r}", field=image_field) from None
    target = max(st.st_size, grow_to_bytes or 0)
    try:
        _probe_size(dst_dir, target)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise NkudoError(
                f"{size_field}: a {target / 1024**3:g} GiB disk is larger than the filesystem holding "
                f"{dst_dir!r} allows for one file",
                code=ErrorCode.DISK_TOO_LARGE,
                field=size_field,
            ) from None
        raise os_failure(exc, f"cannot create the root disk in {dst_dir!r}", field=size_field) from None
    vfs = os.statvfs(dst_dir)
    free = vfs.f_bavail * vfs.f_frsize
    need = st.st_blocks * 512 + SPACE_RESERVE
    if free < need:
        raise NkudoError(
            f"{image_field}: cloning {src!r} needs {need // 1024**2} MiB free in {dst_dir!r} "
            f"(its data plus a {SPACE_RESERVE // 1024**2} MiB reserve) but only {free // 1024**2} MiB are",
            code=ErrorCode.INSUFFICIENT_SPACE,
            field=image_field,
        )


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
    """Clone ``src`` to ``dst`` (atomically); return the method used: reflink or sparse.

    Any failure removes ``dst.partial`` before it propagates: a failed clone leaves no copy.
    """
    tmp = f"{dst}.partial"
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(src_fd).st_size
        dst_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                try:
                    fcntl.ioctl(dst_fd, FICLONE, src_fd)
                    method = "reflink"
                except OSError:
                    # Final size first: a too-large disk fails here, before any data is copied.
                    os.ftruncate(dst_fd, max(size, grow_to_bytes or 0))
                    _sparse_copy(src_fd, dst_fd, size)
                    method = "sparse"
                if grow_to_bytes is not None and grow_to_bytes > size:
                    os.ftruncate(dst_fd, grow_to_bytes)
                os.fsync(dst_fd)
            finally:
                os.close(dst_fd)
            os.rename(tmp, dst)
        except BaseException:
            _unlink_quietly(tmp)
            raise
    finally:
        os.close(src_fd)
    fsync_dir(os.path.dirname(dst))
    return method


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """write-temp + fsync + rename + directory fsync; a failed write leaves no temp file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked (and must not silently truncate)
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")
