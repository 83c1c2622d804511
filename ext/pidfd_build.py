"""cffi builder for ``nkudo_native._pidfd``: pidfd process control syscalls.

Why cffi: every function is a thin syscall shim except ``nk_spawn``, whose
child half must run between clone and execve without touching Python (or
malloc, or any lock) at all, which only C can guarantee. Every function returns
``-errno`` on failure instead of raising, so ``nkudo.proc.pidfd_sys`` owns the
exceptions for both this module and its pure-Python twin.

Why ``clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD)`` rather than clone3: the
pidfd is created atomically with the child either way (no window in which the
pid could be reaped and reused before we hold a reference), but a fork-like
clone3 copies the agent's page tables - measured 25 ms per spawn for a 200 MB
process against about 1 ms for this vfork-style clone - and clone3 with its own
stack needs a per-architecture assembly trampoline that glibc's ``clone()``
already provides (legacy clone accepts ``CLONE_PIDFD`` since Linux 5.2 and
returns the pidfd through ``parent_tid``).

The child (sharing our memory until execve, on its own stack, with every
signal blocked by the parent beforehand so no handler of ours can run in it):
resets signal dispositions and mask, calls setsid() (survives an agent
SIGKILL, no controlling terminal), wires stdin to the given fd (``/dev/null``)
and stdout/stderr to the log fd, closes every other descriptor and execs. A
failure is written as ``(stage, errno)`` into the shared request; the parent,
resumed by the kernel once the child has exec'd or exited, reaps a failed
child itself.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    int nk_pidfd_open(int pid, unsigned int flags);
    int nk_pidfd_send_signal(int pidfd, int sig, unsigned int flags);
    int nk_waitid_pidfd(int pidfd, int options, int *out_pid, int *out_code, int *out_status);
    int nk_proc_start_time(int pid, unsigned long long *out);
    int nk_spawn(const char *path, char *const argv[], char *const envp[],
                 int stdin_fd, int out_fd, int err_fd, int *out_pidfd, int *out_stage);
    """
)

ffibuilder.set_source(
    "nkudo_native._pidfd",
    r"""
    #ifndef _GNU_SOURCE
    #define _GNU_SOURCE
    #endif
    #include <errno.h>
    #include <fcntl.h>
    #include <signal.h>
    #include <stdint.h>
    #include <stdio.h>
    #include <string.h>
    #include <unistd.h>
    #include <sched.h>
    #include <sys/mman.h>
    #include <sys/syscall.h>
    #include <sys/types.h>
    #include <sys/wait.h>

    #ifndef SYS_pidfd_open
    #define SYS_pidfd_open 434
    #endif
    #ifndef SYS_pidfd_send_signal
    #define SYS_pidfd_send_signal 424
    #endif
    #ifndef SYS_close_range
    #define SYS_close_range 436
    #endif
    #ifndef P_PIDFD
    #define P_PIDFD 3
    #endif
    #ifndef CLONE_PIDFD
    #define CLONE_PIDFD 0x00001000
    #endif

    static int nk_pidfd_open(int pid, unsigned int flags)
    {
        long r = syscall(SYS_pidfd_open, pid, flags);
        return r < 0 ? -errno : (int)r;
    }

    static int nk_pidfd_send_signal(int pidfd, int sig, unsigned int flags)
    {
        long r = syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, flags);
        return r < 0 ? -errno : 0;
    }

    /* 0 and *out_pid == 0: nothing to report yet (WNOHANG). */
    static int nk_waitid_pidfd(int pidfd, int options, int *out_pid, int *out_code, int *out_status)
    {
        siginfo_t si;
        int r;
        memset(&si, 0, sizeof si);
        do {
            r = waitid((idtype_t)P_PIDFD, (id_t)pidfd, &si, options);
        } while (r < 0 && errno == EINTR);
        if (r < 0)
            return -errno;
        *out_pid = si.si_pid;
        *out_code = si.si_code;
        *out_status = si.si_status;
        return 0;
    }

    /* Field 22 of /proc/<pid>/stat. comm (field 2) may hold spaces and ')' so parse after the LAST ')'. */
    static int nk_proc_start_time(int pid, unsigned long long *out)
    {
        char path[48], buf[4096];
        ssize_t n, total = 0;
        int fd, field;
        char *p, *end;
        snprintf(path, sizeof path, "/proc/%d/stat", pid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return -errno;
        for (;;) {
            n = read(fd, buf + total, sizeof buf - 1 - (size_t)total);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                int e = errno;
                close(fd);
                return -e;
            }
            if (n == 0 || (size_t)(total + n) >= sizeof buf - 1) {
                total += n;
                break;
            }
            total += n;
        }
        close(fd);
        buf[total] = '\0';
        p = strrchr(buf, ')');
        if (p == NULL)
            return -EPROTO;
        p++;
        /* After ")" comes " state", which is field 3. */
        for (field = 3;; field++) {
            while (*p == ' ')
                p++;
            if (*p == '\0')
                return -EPROTO;
            if (field == 22)
                break;
            while (*p != ' ' && *p != '\0')
                p++;
        }
        if (*p < '0' || *p > '9')
            return -EPROTO;
        errno = 0;
        *out = strtoull(p, &end, 10);
        if (errno != 0 || (*end != ' ' && *end != '\n' && *end != '\0'))
            return -EPROTO;
        return 0;
    }

    struct nk_spawn_req {
        const char *path;
        char *const *argv;
        char *const *envp;
        int stdin_fd, out_fd, err_fd;
        volatile int stage, err; /* written by the child, read by the parent after vfork resumes it */
    };

    static void nk_close_from(int lo)
    {
        /* close_range (5.9+); else close one by one up to the descriptor limit. */
        if (syscall(SYS_close_range, lo, ~0U, 0) < 0) {
            long max = sysconf(_SC_OPEN_MAX);
            if (max < 0 || max > 1048576)
                max = 1048576;
            for (int fd = lo; fd < max; fd++)
                close(fd);
        }
    }

    /*
     * Runs in the child on its own stack, sharing the parent's memory until execve:
     * only raw syscalls, no malloc, no locks, nothing but req->stage/err written.
     */
    static int nk_child(void *arg)
    {
        struct nk_spawn_req *req = arg;
        struct sigaction dfl;
        sigset_t none;
        int sig;

        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        for (sig = 1; sig < NSIG; sig++)
            if (sig != SIGKILL && sig != SIGSTOP)
                sigaction(sig, &dfl, NULL); /* glibc-reserved signals fail with EINVAL: fine */
        sigemptyset(&none);
        if (sigprocmask(SIG_SETMASK, &none, NULL) < 0) {
            req->stage = 1;
            goto fail;
        }
        if (setsid() < 0) {
            req->stage = 2;
            goto fail;
        }
        if (dup2(req->stdin_fd, 0) < 0 || dup2(req->out_fd, 1) < 0 || dup2(req->err_fd, 2) < 0) {
            req->stage = 3;
            goto fail;
        }
        nk_close_from(3);
        execve(req->path, req->argv, req->envp);
        req->stage = 4;
    fail:
        req->err = errno;
        _exit(127);
        return 0;
    }

    /*
     * Returns the child's pid (and *out_pidfd) or -errno. On a child-side failure
     * *out_stage says where: 1 signals, 2 setsid, 3 dup2, 4 execve.
     */
    static int nk_spawn(const char *path, char *const argv[], char *const envp[],
                        int stdin_fd, int out_fd, int err_fd, int *out_pidfd, int *out_stage)
    {
        struct nk_spawn_req req;
        const size_t stack_size = 256 * 1024;
        sigset_t all, old;
        void *stack;
        int pid, e, pidfd = -1;

        *out_stage = 0;
        *out_pidfd = -1;
        if (stdin_fd < 3 || out_fd < 3 || err_fd < 3)
            return -EINVAL; /* the caller moves them above 2 so the dup2 order cannot clobber them */
        memset(&req, 0, sizeof req);
        req.path = path;
        req.argv = argv;
        req.envp = envp;
        req.stdin_fd = stdin_fd;
        req.out_fd = out_fd;
        req.err_fd = err_fd;

        stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (stack == MAP_FAILED)
            return -errno;
        /* No signal handler of ours may run in the child (it shares our memory) before it resets them.
           sigprocmask, not pthread_sigmask: on Linux both set the calling thread's mask, but glibc >= 2.32
           versions pthread_sigmask GLIBC_2.32, which would hold the wheel above manylinux_2_28 (issue 14). */
        sigfillset(&all);
        sigprocmask(SIG_SETMASK, &all, &old);
        pid = clone(nk_child, (char *)stack + stack_size,
                    CLONE_VM | CLONE_VFORK | CLONE_PIDFD | SIGCHLD, &req, &pidfd);
        e = errno;
        sigprocmask(SIG_SETMASK, &old, NULL);
        munmap(stack, stack_size);
        if (pid < 0)
            return -e;
        /* CLONE_VFORK: we run again only once the child has exec'd or exited. */
        if (req.stage != 0) {
            siginfo_t si;
            while (waitid((idtype_t)P_PIDFD, (id_t)pidfd, &si, WEXITED) < 0 && errno == EINTR)
                ;
            close(pidfd);
            *out_stage = req.stage;
            return req.err > 0 ? -req.err : -EIO;
        }
        *out_pidfd = pidfd;
        return pid;
    }
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
