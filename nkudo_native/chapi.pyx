# cython: language_level=3
"""Cloud Hypervisor API transport: one request/response exchange over AF_UNIX, in C.

Why native: the agent polls ``vmm.ping``/``vm.info`` for every VM; the pure
Python path spends most of its CPU in the socket module and ``http.client``.
This module only moves bytes (connect, ``sendmsg`` with optional SCM_RIGHTS
fds, receive until the response is complete, all under one deadline, GIL
released while waiting). Building requests and parsing responses stay in the
shared sans-I/O codec ``nkudo.chapi.codec``.

Contract (shared with the twin ``nkudo.chapi.transport.roundtrip_py``):
``roundtrip(path, request, fds, timeout) -> bytes`` returns the response bytes,
cut to the size given by the framing rules of ``codec.expected_size`` (which
the C function ``nk_expected`` implements byte for byte), or everything read
before EOF if the response is incomplete. A failed syscall raises
``OSError(errno, stage)`` with ``stage`` one of ``socket``, ``connect``,
``send``, ``recv``; running out of time raises ``OSError(ETIMEDOUT, stage)``.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize

cdef extern from *:
    """
    #include <sys/socket.h>
    #include <sys/un.h>
    #include <poll.h>
    #include <errno.h>
    #include <string.h>
    #include <strings.h>
    #include <stdlib.h>
    #include <stddef.h>
    #include <unistd.h>
    #include <time.h>

    #define NK_MAX_FDS 253
    #define NK_MAX_HEAD 16384
    #define NK_MAX_BODY (64LL << 20)

    static double nk_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }

    static int nk_remaining_ms(double deadline) {
        double ms = (deadline - nk_now()) * 1000.0;
        if (ms <= 0.0) return 0;
        if (ms > 2147483000.0) return 2147483000;
        int v = (int)ms;
        return (double)v < ms ? v + 1 : v;
    }

    static const char *nk_find_crlf(const char *b, size_t from, size_t n) {
        return n >= 2 && from <= n - 2 ? memmem(b + from, n - from, "\\r\\n", 2) : NULL;
    }

    /* Mirror of nkudo.chapi.codec.expected_size. */
    static long long nk_expected(const char *b, size_t n) {
        const char *p = memmem(b, n, "\\r\\n\\r\\n", 4);
        if (p == NULL) return n > NK_MAX_HEAD ? (long long)n : -1;
        size_t h = (size_t)(p - b);
        long long head_end = (long long)h + 4;
        if (n >= 10 && b[9] == '1') return head_end;
        if (n >= 12 && b[9] == '2' && b[10] == '0' && b[11] == '4') return head_end;
        const char *q = nk_find_crlf(b, 0, n);
        size_t pos = (size_t)(q - b);
        while (pos < h) {
            size_t start = pos + 2;
            const char *e = nk_find_crlf(b, start, n);
            size_t end = (size_t)(e - b);
            const char *c = memchr(b + start, ':', end - start);
            if (c != NULL && (size_t)(c - b) - start == 14 && strncasecmp(b + start, "content-length", 14) == 0) {
                size_t vs = (size_t)(c - b) + 1, ve = end;
                while (vs < ve && (b[vs] == ' ' || b[vs] == '\\t')) vs++;
                while (ve > vs && (b[ve - 1] == ' ' || b[ve - 1] == '\\t')) ve--;
                if (ve - vs == 0 || ve - vs > 18) return head_end;
                long long v = 0;
                for (size_t i = vs; i < ve; i++) {
                    if (b[i] < '0' || b[i] > '9') return head_end;
                    v = v * 10 + (b[i] - '0');
                }
                if (v > NK_MAX_BODY) return head_end;
                return head_end + v;
            }
            pos = end;
        }
        return head_end;
    }

    enum { NK_STAGE_SOCKET = 0, NK_STAGE_CONNECT = 1, NK_STAGE_SEND = 2, NK_STAGE_RECV = 3 };

    static int nk_wait(int fd, short events, double deadline) {
        for (;;) {
            struct pollfd pfd;
            pfd.fd = fd; pfd.events = events; pfd.revents = 0;
            int ms = nk_remaining_ms(deadline);
            if (ms == 0) return ETIMEDOUT;
            int r = poll(&pfd, 1, ms);
            if (r > 0) return 0;
            if (r == 0) return ETIMEDOUT;
            if (errno != EINTR) return errno;
        }
    }

    /* Returns 0 and a malloc'd buffer, or an errno with *stage set. */
    static int nk_tchar(unsigned char c) {
        if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return 1;
        return c != 0 && strchr("!#$%&'*+.^_`|~-", c) != NULL;
    }
    static int nk_vchar(unsigned char c) { return c == '\\t' || (c >= 0x20 && c <= 0x7e); }

    /* Fast path of nkudo.chapi.codec.parse_response for well-formed responses.
       Returns 1 and fills the outputs only when the Python parser would accept the
       input with exactly this result; returns 0 on anything else (the caller then
       runs the Python parser, which gives the authoritative error). */
    static int nk_parse(const unsigned char *b, size_t n, int *status, size_t *reason_off, size_t *reason_len,
                        size_t *block_off, size_t *block_len, size_t *body_off) {
        const unsigned char *p = memmem(b, n, "\\r\\n\\r\\n", 4);
        if (p == NULL) return 0;
        size_t h = (size_t)(p - b);
        if (h + 4 > NK_MAX_HEAD) return 0;
        if (h < 12 || memcmp(b, "HTTP/1.", 7) != 0 || (b[7] != '1' && b[7] != '0') || b[8] != ' ') return 0;
        if (b[9] < '1' || b[9] > '9' || b[10] < '0' || b[10] > '9' || b[11] < '0' || b[11] > '9') return 0;
        int st = (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
        size_t i = 12, r0 = 12, r1 = 12;
        if (b[i] == ' ') {
            r0 = ++i;
            while (i < h && nk_vchar(b[i])) i++;
            r1 = i;
        }
        if (b[i] != '\\r' || b[i + 1] != '\\n') return 0;  /* i <= h: the status line ends at the first CRLF */
        i += 2;                                   /* start of the header block */
        size_t blk = i, end = h + 2;
        long long length = -1;
        while (i < end) {                         /* each line: token ':' vchar* CRLF */
            size_t name = i;
            while (i < end && nk_tchar(b[i])) i++;
            if (i == name || i >= end || b[i] != ':') return 0;
            size_t nlen = i - name;
            i++;
            size_t v = i;
            while (i < end && nk_vchar(b[i])) i++;
            if (i >= end || b[i] != '\\r' || b[i + 1] != '\\n') return 0;
            size_t ve = i;
            i += 2;
            if (nlen == 17 && strncasecmp((const char *)b + name, "transfer-encoding", 17) == 0) return 0;
            if (nlen == 14 && strncasecmp((const char *)b + name, "content-length", 14) == 0) {
                if (length >= 0) return 0;        /* repeated: leave it to the Python parser */
                while (v < ve && (b[v] == ' ' || b[v] == '\\t')) v++;
                while (ve > v && (b[ve - 1] == ' ' || b[ve - 1] == '\\t')) ve--;
                if (ve == v || ve - v > 18) return 0;
                long long val = 0;
                for (size_t k = v; k < ve; k++) {
                    if (b[k] < '0' || b[k] > '9') return 0;
                    val = val * 10 + (b[k] - '0');
                }
                length = val;
            }
        }
        if (st < 200) return 0;
        if (length < 0) {
            if (st != 204) return 0;
            length = 0;
        } else if (st == 204 && length != 0) return 0;
        if (length > NK_MAX_BODY) return 0;
        if ((long long)(n - (h + 4)) != length) return 0;
        *status = st; *reason_off = r0; *reason_len = r1 - r0;
        *block_off = blk; *block_len = end - blk; *body_off = h + 4;
        return 1;
    }

    static int nk_roundtrip(const char *path, size_t pathlen, const char *req, size_t reqlen,
                            const int *fds, int nfds, double timeout,
                            char **out, size_t *outlen, int *stage) {
        double deadline = nk_now() + timeout;
        struct sockaddr_un addr;
        *out = NULL; *outlen = 0;
        if (pathlen == 0 || pathlen >= sizeof(addr.sun_path)) { *stage = NK_STAGE_CONNECT; return ENAMETOOLONG; }
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) { *stage = NK_STAGE_SOCKET; return errno; }
        memset(&addr, 0, sizeof(addr));
        addr.sun_family = AF_UNIX;
        memcpy(addr.sun_path, path, pathlen);
        socklen_t alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + pathlen + 1);
        for (;;) {
            if (connect(fd, (struct sockaddr *)&addr, alen) == 0) break;
            int e = errno;
            if (e == EINTR) continue;
            if (e == EAGAIN) {  /* listen backlog full: the single-threaded server is busy */
                if (nk_remaining_ms(deadline) == 0) { close(fd); *stage = NK_STAGE_CONNECT; return ETIMEDOUT; }
                struct timespec ts = {0, 1000000};
                nanosleep(&ts, NULL);
                continue;
            }
            close(fd); *stage = NK_STAGE_CONNECT; return e;
        }
        size_t sent = 0;
        int with_fds = nfds > 0;
        while (sent < reqlen || with_fds) {
            ssize_t r;
            if (with_fds) {
                union { char buf[CMSG_SPACE(sizeof(int) * NK_MAX_FDS)]; struct cmsghdr align; } u;
                struct iovec iov;
                struct msghdr msg;
                memset(&msg, 0, sizeof(msg));
                iov.iov_base = (void *)(req + sent);
                iov.iov_len = reqlen - sent;
                msg.msg_iov = &iov; msg.msg_iovlen = 1;
                msg.msg_control = u.buf;
                msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
                struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
                cm->cmsg_level = SOL_SOCKET; cm->cmsg_type = SCM_RIGHTS;
                cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
                memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
                r = sendmsg(fd, &msg, MSG_NOSIGNAL);
            } else {
                r = send(fd, req + sent, reqlen - sent, MSG_NOSIGNAL);
            }
            if (r < 0) {
                int e = errno;
                if (e == EINTR) continue;
                if (e == EAGAIN) {
                    e = nk_wait(fd, POLLOUT, deadline);
                    if (e == 0) continue;
                }
                close(fd); *stage = NK_STAGE_SEND; return e;
            }
            with_fds = 0;
            sent += (size_t)r;
        }
        /* The peer is another process: nothing can be there yet, so wait before the first recv. */
        int we = nk_wait(fd, POLLIN, deadline);
        if (we != 0) { close(fd); *stage = NK_STAGE_RECV; return we; }
        size_t cap = 4096, len = 0;
        char *buf = malloc(cap);
        if (buf == NULL) { close(fd); *stage = NK_STAGE_RECV; return ENOMEM; }
        for (;;) {
            long long want = nk_expected(buf, len);
            if (want >= 0 && (size_t)want <= len) { len = (size_t)want; break; }
            if (len == cap) {
                size_t ncap = cap * 2;
                if (want > 0 && (size_t)want > ncap) ncap = (size_t)want;
                char *nb = realloc(buf, ncap);
                if (nb == NULL) { free(buf); close(fd); *stage = NK_STAGE_RECV; return ENOMEM; }
                buf = nb; cap = ncap;
            }
            ssize_t r = recv(fd, buf + len, cap - len, 0);
            if (r > 0) { len += (size_t)r; continue; }
            if (r == 0) break;
            int e = errno;
            if (e == EINTR) continue;
            if (e == EAGAIN) {
                e = nk_wait(fd, POLLIN, deadline);
                if (e == 0) continue;
            }
            free(buf); close(fd); *stage = NK_STAGE_RECV; return e;
        }
        close(fd);
        *out = buf; *outlen = len;
        return 0;
    }
    """
    int nk_roundtrip(const char *path, size_t pathlen, const char *req, size_t reqlen,
                     const int *fds, int nfds, double timeout,
                     char **out, size_t *outlen, int *stage) nogil
    long long nk_expected(const char *b, size_t n) nogil
    int nk_parse(const unsigned char *b, size_t n, int *status, size_t *reason_off, size_t *reason_len,
                 size_t *block_off, size_t *block_len, size_t *body_off) nogil
    int NK_MAX_FDS

cdef extern from "<stdlib.h>" nogil:
    void free(void *ptr)

_STAGES = ("socket", "connect", "send", "recv")


def expected_size(data):
    """Framing decision for ``data`` (same rules as ``codec.expected_size``)."""
    cdef const unsigned char[:] view = data
    if view.shape[0] == 0:
        return -1
    return nk_expected(<const char *>&view[0], <size_t>view.shape[0])


def parse_fast(bytes data):
    """``(status, reason, header_block, body)`` of a well-formed response, else None.

    Contract with the Python parser ``nkudo.chapi.codec.parse_response`` (its twin):
    whenever this returns a tuple, the Python parser accepts ``data`` with exactly
    these values; on None (malformed or merely unusual input) the caller runs the
    Python parser, which decides and words every error.
    """
    cdef const unsigned char *b = data
    cdef int status = 0
    cdef size_t r0 = 0, rl = 0, b0 = 0, bl = 0, body = 0
    if not nk_parse(b, <size_t>len(data), &status, &r0, &rl, &b0, &bl, &body):
        return None
    return (status, data[r0:r0 + rl], data[b0:b0 + bl], data[body:])


def roundtrip(bytes path, bytes request, fds, double timeout):
    """Send ``request`` (with ``fds`` as SCM_RIGHTS) to the socket ``path``; return the response."""
    cdef int cfds[253]
    cdef int nfds = 0
    cdef object f
    for f in fds:
        if nfds >= NK_MAX_FDS:
            raise ValueError(f"at most {NK_MAX_FDS} file descriptors per request")
        cfds[nfds] = f
        nfds += 1
    cdef const char *cpath = path
    cdef size_t pathlen = len(path)
    cdef const char *creq = request
    cdef size_t reqlen = len(request)
    cdef char *out = NULL
    cdef size_t outlen = 0
    cdef int stage = 0
    cdef int rc
    with nogil:
        rc = nk_roundtrip(cpath, pathlen, creq, reqlen, cfds, nfds, timeout, &out, &outlen, &stage)
    if rc != 0:
        raise OSError(rc, _STAGES[stage])
    try:
        return PyBytes_FromStringAndSize(out, <Py_ssize_t>outlen)
    finally:
        free(out)
