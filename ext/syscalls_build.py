"""cffi builder for ``nkudo_native._syscalls``: raw syscalls the stdlib lacks or hides.

Why cffi here rather than Cython: these are one-line syscall shims, and API-mode
cffi gives a typed C boundary with no Python glue to maintain. Every function
returns ``-errno`` on failure instead of raising, so the Python layer
(``nkudo.host.syscalls``) owns the errors, exactly as for its twin
(``nkudo.host._syscalls_twin``).
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    int nk_pidfd_open(int pid, unsigned int flags);
    int nk_cap_effective(uint64_t *out);
    int nk_setns(int fd, int nstype);
    """
)

ffibuilder.set_source(
    "nkudo_native._syscalls",
    r"""
    #include <errno.h>
    #include <stdint.h>
    #include <unistd.h>
    #include <sys/syscall.h>
    #include <linux/capability.h>
    #include <sched.h>

    #ifndef SYS_pidfd_open
    #define SYS_pidfd_open 434
    #endif

    static int nk_pidfd_open(int pid, unsigned int flags)
    {
        long r = syscall(SYS_pidfd_open, pid, flags);
        return r < 0 ? -errno : (int)r;
    }

    static int nk_setns(int fd, int nstype)
    {
        return setns(fd, nstype) < 0 ? -errno : 0;
    }

    static int nk_cap_effective(uint64_t *out)
    {
        struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
        struct __user_cap_data_struct data[2];
        if (syscall(SYS_capget, &hdr, data) < 0)
            return -errno;
        *out = ((uint64_t)data[1].effective << 32) | (uint64_t)data[0].effective;
        return 0;
    }
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
