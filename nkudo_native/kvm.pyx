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


# --------------------------------------------------------------------------------------------
# Guest-execution smoke test: does KVM_RUN really run guest code on this host?

cdef extern from *:
    """
    #include <fcntl.h>
    #include <unistd.h>
    #include <errno.h>
    #include <string.h>
    #include <sys/ioctl.h>
    #include <sys/mman.h>
    #include <linux/kvm.h>

    #define NK_SMOKE_MAX_EXITS 8

    typedef struct {
        const char *stage;     /* NULL when every step worked */
        int err;
        int n_exits;
        int exits[NK_SMOKE_MAX_EXITS];
        int io_dir, io_size, io_port, io_value;
    } nk_smoke_result;

    /* Real-mode guest: mov al, value; out port, al; hlt. Mirrored in nkudo.host.kvm.SMOKE_CODE. */
    static const unsigned char NK_SMOKE_CODE[] = {0xB0, 0x4E, 0xE6, 0x10, 0xF4};

    static void nk_smoke(const char *path, nk_smoke_result *r) {
        int kvm = -1, vm = -1, vcpu = -1, i;
        void *mem = MAP_FAILED, *run_map = MAP_FAILED;
        long run_size = 0;
        struct kvm_userspace_memory_region region;
        struct kvm_sregs sregs;
        struct kvm_regs regs;
        struct kvm_run *run;
        memset(r, 0, sizeof(*r));
        r->io_dir = r->io_size = r->io_port = r->io_value = -1;
    #define NK_FAIL(s) do { r->stage = (s); r->err = errno; goto out; } while (0)
        kvm = open(path, O_RDWR | O_CLOEXEC);
        if (kvm < 0) NK_FAIL("open");
        vm = ioctl(kvm, KVM_CREATE_VM, 0);
        if (vm < 0) NK_FAIL("create_vm");
    #if defined(__x86_64__) || defined(__i386__)
        /* Needed for real mode on Intel CPUs without unrestricted guest; harmless elsewhere. */
        if (ioctl(vm, KVM_SET_TSS_ADDR, 0x7fffd000UL) < 0) NK_FAIL("set_tss_addr");
    #endif
        mem = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) NK_FAIL("mmap_memory");
        memcpy(mem, NK_SMOKE_CODE, sizeof(NK_SMOKE_CODE));
        memset(&region, 0, sizeof(region));
        region.slot = 0;
        region.guest_phys_addr = 0x1000;
        region.memory_size = 0x1000;
        region.userspace_addr = (unsigned long)mem;
        if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) NK_FAIL("set_user_memory_region");
        vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
        if (vcpu < 0) NK_FAIL("create_vcpu");
        run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
        if (run_size <= 0) {
            if (run_size == 0) errno = EINVAL;
            NK_FAIL("get_vcpu_mmap_size");
        }
        run_map = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
        if (run_map == MAP_FAILED) NK_FAIL("mmap_vcpu");
        run = (struct kvm_run *)run_map;
    #if defined(__x86_64__) || defined(__i386__)
        if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) NK_FAIL("get_sregs");
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) NK_FAIL("set_sregs");
        memset(&regs, 0, sizeof(regs));
        regs.rip = 0x1000;
        regs.rflags = 0x2;
        if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) NK_FAIL("set_regs");
    #else
        errno = ENOSYS;
        NK_FAIL("arch");
    #endif
        for (i = 0; i < NK_SMOKE_MAX_EXITS; i++) {
            if (ioctl(vcpu, KVM_RUN, 0) < 0) {
                if (errno == EINTR) continue;
                NK_FAIL("run");
            }
            r->exits[r->n_exits++] = (int)run->exit_reason;
            if (run->exit_reason == KVM_EXIT_IO) {
                r->io_dir = run->io.direction;
                r->io_size = run->io.size;
                r->io_port = run->io.port;
                r->io_value = ((unsigned char *)run_map)[run->io.data_offset];
                continue;
            }
            break;  /* HLT (the expected end) or anything unexpected */
        }
    out:
        if (run_map != MAP_FAILED) munmap(run_map, run_size);
        if (vcpu >= 0) close(vcpu);
        if (mem != MAP_FAILED) munmap(mem, 0x1000);
        if (vm >= 0) close(vm);
        if (kvm >= 0) close(kvm);
    #undef NK_FAIL
    }
    """
    ctypedef struct nk_smoke_result:
        const char *stage
        int err
        int n_exits
        int exits[8]
        int io_dir
        int io_size
        int io_port
        int io_value
    void nk_smoke(const char *path, nk_smoke_result *r) nogil


def smoke(path):
    """Run 5 bytes of real-mode guest code (``out`` then ``hlt``) in a fresh VM with one vCPU.

    Returns ``(stage, errno, exits, io)``: ``stage`` is ``""`` when every
    ioctl worked, else the name of the failing step; ``exits`` the KVM exit
    reasons in order; ``io`` ``(direction, size, port, value)`` of the last
    I/O exit, ``-1`` each when there was none.
    """
    cdef bytes bpath
    if isinstance(path, str):
        bpath = (<str>path).encode("utf-8", "surrogateescape")
    else:
        bpath = bytes(path)
    if b"\0" in bpath:
        raise ValueError("embedded null byte")
    cdef const char *cpath = bpath
    cdef nk_smoke_result r
    with nogil:
        nk_smoke(cpath, &r)
    stage = "" if r.stage == NULL else r.stage.decode("ascii")
    return (
        stage,
        r.err if r.stage != NULL else 0,
        tuple([r.exits[i] for i in range(r.n_exits)]),
        (r.io_dir, r.io_size, r.io_port, r.io_value),
    )
