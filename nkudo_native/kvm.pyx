# cython: language_level=3
"""KVM capability probe: every ioctl of the preflight in one C call.

Contract (shared with the twin ``nkudo.host.kvm._probe_py``): no exception for
a failed syscall; the result is a tuple of raw numbers
``(open_errno, api_version, cap_values, vcpu_mmap_size, create_vm_errno)``
where a failed ioctl is reported as ``-errno``.
"""

from libc.errno cimport errno

cdef extern from "<fcntl.h>" nogil:
    int c_open "open"(const char *path, int flags)
    int O_RDWR
    int O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int c_close "close"(int fd)

cdef extern from "<sys/ioctl.h>" nogil:
    int c_ioctl "ioctl"(int fd, unsigned long request, ...)

DEF KVM_GET_API_VERSION = 0xAE00
DEF KVM_CREATE_VM = 0xAE01
DEF KVM_CHECK_EXTENSION = 0xAE03
DEF KVM_GET_VCPU_MMAP_SIZE = 0xAE04
DEF KVM_API_VERSION = 12


def probe(path, caps, bint create_vm):
    """Open ``path`` read-write and run the KVM preflight ioctls."""
    cdef bytes bpath
    if isinstance(path, str):
        bpath = (<str>path).encode("utf-8", "surrogateescape")
    else:
        bpath = bytes(path)
    if b"\0" in bpath:
        raise ValueError("embedded null byte")
    cdef list cap_list = [int(c) for c in caps]
    cdef const char *cpath = bpath
    cdef int fd, api, r, vmfd, create_err = -1
    cdef long cap
    cdef long mmap_size
    with nogil:
        fd = c_open(cpath, O_RDWR | O_CLOEXEC)
    if fd < 0:
        return (errno, -1, (), -1, -1)
    try:
        api = c_ioctl(fd, KVM_GET_API_VERSION, 0)
        if api < 0:
            api = -errno
        if api != KVM_API_VERSION:
            return (0, api, (), -1, -1)
        values = []
        for cap in cap_list:
            r = c_ioctl(fd, KVM_CHECK_EXTENSION, cap)
            values.append(r if r >= 0 else -errno)
        mmap_size = c_ioctl(fd, KVM_GET_VCPU_MMAP_SIZE, 0)
        if mmap_size < 0:
            mmap_size = -errno
        if create_vm:
            with nogil:
                vmfd = c_ioctl(fd, KVM_CREATE_VM, 0)
                if vmfd < 0:
                    create_err = errno
                else:
                    c_close(vmfd)
                    create_err = 0
        return (0, api, tuple(values), mmap_size, create_err)
    finally:
        c_close(fd)
