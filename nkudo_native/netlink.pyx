# cython: language_level=3
"""rtnetlink + /dev/net/tun transport and codec for the agent's hot network operations.

Contract (shared with the twin ``nkudo.net._nlpy``; the test-suite checks both
on a live kernel): same class and signatures, links are the dicts of
``nkudo.net.rtnl.parse_link``, a failed system call raises
``OSError(errno, strerror, step)`` with ``step`` naming the request
(``RTM_GETLINK``/``RTM_SETLINK``/``RTM_NEWLINK``/``RTM_DELLINK``/``open``/
``TUNSETIFF``/``TUNSETOWNER``/``TUNSETPERSIST``), an invalid interface name
raises ``ValueError`` before anything is sent. The GIL is released around
every system call (link deletion blocks for an RCU grace period).
"""

from libc.errno cimport errno, EINTR, ENODEV, EMSGSIZE, EIO
from libc.string cimport memcpy, memset, strerror
from libc.stdlib cimport malloc, free
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t
from cpython.exc cimport PyErr_CheckSignals

cdef extern from "<sys/types.h>":
    ctypedef long ssize_t

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    int c_socket "socket"(int domain, int type, int protocol)
    int c_bind "bind"(int fd, const sockaddr *addr, socklen_t len)
    ssize_t c_send "send"(int fd, const void *buf, size_t n, int flags)
    ssize_t c_recv "recv"(int fd, void *buf, size_t n, int flags)
    int AF_NETLINK
    int SOCK_RAW
    int SOCK_CLOEXEC
    int MSG_TRUNC

cdef extern from "<linux/netlink.h>" nogil:
    int NETLINK_ROUTE
    struct sockaddr_nl:
        unsigned short nl_family
        unsigned int nl_pid
        unsigned int nl_groups
    struct nlmsghdr:
        uint32_t nlmsg_len
        uint16_t nlmsg_type
        uint16_t nlmsg_flags
        uint32_t nlmsg_seq
        uint32_t nlmsg_pid

cdef extern from "<fcntl.h>" nogil:
    int c_open "open"(const char *path, int flags)
    int O_RDWR
    int O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int c_close "close"(int fd)

cdef extern from "<sys/ioctl.h>" nogil:
    int c_ioctl "ioctl"(int fd, unsigned long request, ...)

DEF NLMSG_ERROR = 2
DEF NLMSG_DONE = 3
DEF RTM_NEWLINK = 16
DEF RTM_DELLINK = 17
DEF RTM_GETLINK = 18
DEF RTM_SETLINK = 19
DEF NLM_F_REQUEST = 0x1
DEF NLM_F_MULTI = 0x2
DEF NLM_F_ACK = 0x4
DEF NLM_F_DUMP = 0x300
DEF NLM_F_EXCL = 0x200
DEF NLM_F_CREATE = 0x400

DEF IFLA_ADDRESS = 1
DEF IFLA_IFNAME = 3
DEF IFLA_MTU = 4
DEF IFLA_MASTER = 10
DEF IFLA_OPERSTATE = 16
DEF IFLA_LINKINFO = 18
DEF IFLA_IFALIAS = 20
DEF IFLA_GROUP = 27
DEF IFLA_EXT_MASK = 29
DEF IFLA_STATS64 = 23
DEF IFLA_INFO_KIND = 1
DEF IFLA_INFO_DATA = 2
DEF RTEXT_FILTER_SKIP_STATS = 8
DEF IFLA_TUN_OWNER = 1
DEF IFLA_TUN_TYPE = 3
DEF IFLA_TUN_PI = 4
DEF IFLA_TUN_VNET_HDR = 5
DEF IFLA_TUN_PERSIST = 6
DEF IFLA_TUN_MULTI_QUEUE = 7
DEF IFF_UP = 1
DEF IFF_TAP = 2

DEF TUNSETIFF = 0x400454CA
DEF TUNSETPERSIST = 0x400454CB
DEF TUNSETOWNER = 0x400454CC

DEF HDRLEN = 32          # nlmsghdr (16) + ifinfomsg (16)
DEF SENDSIZE = 1024      # name + alias (< 256) + a few u32s
DEF RECVSIZE = 65536
DEF IFNAMSIZ = 16
DEF IFALIASZ = 256

# Reply modes of _exchange.
DEF WANT_ACK = 0
DEF WANT_ONE = 1
DEF WANT_ALL = 2
DEF WANT_TAP_STATS = 3

_OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")
_HEX = b"0123456789abcdef"

_STEPS = {
    RTM_GETLINK: "RTM_GETLINK",
    RTM_SETLINK: "RTM_SETLINK",
    RTM_NEWLINK: "RTM_NEWLINK",
    RTM_DELLINK: "RTM_DELLINK",
}


cdef object _oserror(int err, str step):
    return OSError(err, strerror(err).decode("utf-8", "replace"), step)


cdef bytes _ifname(object name):
    """ASCII bytes of a valid kernel interface name (dev_valid_name), else ValueError."""
    cdef bytes raw
    if not isinstance(name, str):
        raise TypeError("interface name must be str")
    try:
        raw = (<str>name).encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"invalid interface name {name!r}")
    cdef Py_ssize_t n = len(raw), i
    cdef unsigned char c
    if n == 0 or n >= IFNAMSIZ or raw == b"." or raw == b"..":
        raise ValueError(f"invalid interface name {name!r}")
    for i in range(n):
        c = raw[i]
        if c == 47 or c == 58 or c == 32 or c == 0 or (9 <= c <= 13):
            raise ValueError(f"invalid interface name {name!r}")
    return raw


cdef inline size_t _align4(size_t n) noexcept nogil:
    return (n + 3) & ~(<size_t>3)


cdef size_t _put(char *buf, size_t off, uint16_t kind, const void *data, size_t n) noexcept nogil:
    cdef uint16_t alen = <uint16_t>(4 + n)
    memcpy(buf + off, &alen, 2)
    memcpy(buf + off + 2, &kind, 2)
    if n:
        memcpy(buf + off + 4, data, n)
    memset(buf + off + 4 + n, 0, _align4(4 + n) - (4 + n))
    return off + _align4(4 + n)


cdef inline size_t _put_u32(char *buf, size_t off, uint16_t kind, uint32_t v) noexcept nogil:
    return _put(buf, off, kind, &v, 4)


cdef void _header(char *buf, uint16_t mtype, uint16_t flags, uint32_t seq,
                  int32_t index, uint32_t ifi_flags, uint32_t change) noexcept nogil:
    cdef nlmsghdr *h = <nlmsghdr *>buf
    memset(buf, 0, HDRLEN)
    h.nlmsg_type = mtype
    h.nlmsg_flags = flags
    h.nlmsg_seq = seq
    memcpy(buf + 20, &index, 4)
    memcpy(buf + 24, &ifi_flags, 4)
    memcpy(buf + 28, &change, 4)


cdef inline uint32_t _u32(const char *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef str _cstr(const char *p, Py_ssize_t n):
    cdef Py_ssize_t i = 0
    while i < n and p[i] != 0:
        i += 1
    return p[:i].decode("utf-8", "replace")


cdef bint _flag(const char *p, Py_ssize_t n) noexcept:
    return p != NULL and n > 0 and p[0] != 0


DEF NK_MAX_ATTR = 64  # every attribute type read below is smaller; larger ones are skipped


cdef void _scan_attrs(const char *p, Py_ssize_t size, Py_ssize_t off, const char **ptrs, Py_ssize_t *lens) noexcept nogil:
    """Walk the rtattrs of ``p[off:size]`` into a table by type (last one wins, as in rtnl.parse_attrs)."""
    cdef uint16_t a_len, a_type
    cdef Py_ssize_t i
    for i in range(NK_MAX_ATTR):
        ptrs[i] = NULL
        lens[i] = 0
    while off + 4 <= size:
        memcpy(&a_len, p + off, 2)
        memcpy(&a_type, p + off + 2, 2)
        if a_len < 4:
            break
        a_type &= 0x3FFF
        if a_type < NK_MAX_ATTR:
            ptrs[a_type] = p + off + 4
            lens[a_type] = min(<Py_ssize_t>a_len, size - off) - 4
        off += _align4(a_len)


include "netlink_parse.pxi"


cdef class NetlinkSocket:
    """An rtnetlink socket in the calling thread's network namespace (one per thread)."""

    cdef int fd
    cdef uint32_t seq
    cdef char *rbuf
    cdef char sbuf[SENDSIZE]

    def __cinit__(self):
        self.fd = -1
        self.seq = 0
        self.rbuf = <char *>malloc(RECVSIZE)
        if self.rbuf == NULL:
            raise MemoryError()

    def __init__(self):
        cdef sockaddr_nl addr
        cdef int fd, err = 0
        memset(&addr, 0, sizeof(addr))
        addr.nl_family = AF_NETLINK
        with nogil:
            fd = c_socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE)
            if fd < 0:
                err = errno
            elif c_bind(fd, <sockaddr *>&addr, sizeof(addr)) < 0:
                err = errno
                c_close(fd)
                fd = -1
        if fd < 0:
            raise OSError(err, strerror(err).decode("utf-8", "replace"))
        self.fd = fd

    def __dealloc__(self):
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1
        if self.rbuf != NULL:
            free(self.rbuf)
            self.rbuf = NULL

    def close(self):
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef uint32_t _next_seq(self):
        self.seq = (self.seq + 1) & 0x7FFFFFFF
        if self.seq == 0:
            self.seq = 1
        return self.seq

    cdef int _exchange(self, size_t msglen, int want, list out) except -1:
        """Send sbuf[:msglen]; collect parsed RTM_NEWLINK answers; return errno (0 = success)."""
        cdef nlmsghdr *h = <nlmsghdr *>self.sbuf
        cdef uint32_t seq = h.nlmsg_seq
        cdef ssize_t n
        cdef int err = 0
        cdef size_t off
        cdef nlmsghdr *m
        cdef int32_t nlerr
        cdef object item
        if self.fd < 0:
            raise ValueError("netlink socket is closed")
        h.nlmsg_len = <uint32_t>msglen
        while True:
            with nogil:
                n = c_send(self.fd, self.sbuf, msglen, 0)
                if n < 0:
                    err = errno
            if n >= 0:
                break
            if err != EINTR:
                return err
            PyErr_CheckSignals()
        while True:
            with nogil:
                n = c_recv(self.fd, self.rbuf, RECVSIZE, MSG_TRUNC)
                if n < 0:
                    err = errno
            if n < 0:
                if err == EINTR:
                    PyErr_CheckSignals()
                    continue
                return err
            if n > RECVSIZE:
                return EMSGSIZE
            off = 0
            while off + 16 <= <size_t>n:
                m = <nlmsghdr *>(self.rbuf + off)
                if m.nlmsg_len < 16 or off + m.nlmsg_len > <size_t>n:
                    raise ValueError("truncated netlink message")
                if m.nlmsg_seq == seq:
                    if m.nlmsg_type == NLMSG_ERROR:
                        if m.nlmsg_len < 20:
                            raise ValueError("truncated netlink message")
                        memcpy(&nlerr, self.rbuf + off + 16, 4)
                        return -nlerr
                    if m.nlmsg_type == NLMSG_DONE:
                        return 0
                    if m.nlmsg_type == RTM_NEWLINK and want == WANT_TAP_STATS:
                        item = _parse_tap_stats(self.rbuf + off + 16, m.nlmsg_len - 16)
                        if item is not None:
                            out.append(item)
                    elif m.nlmsg_type == RTM_NEWLINK and want != WANT_ACK:
                        out.append(_parse_link(self.rbuf + off + 16, m.nlmsg_len - 16))
                        if want == WANT_ONE and not (m.nlmsg_flags & NLM_F_MULTI):
                            return 0
                off += _align4(m.nlmsg_len)

    def get_link(self, name):
        """The link called ``name`` (one RTM_GETLINK by name), or None when absent."""
        cdef bytes raw = _ifname(name)
        cdef size_t off
        cdef list out = []
        _header(self.sbuf, RTM_GETLINK, NLM_F_REQUEST, self._next_seq(), 0, 0, 0)
        off = _put(self.sbuf, HDRLEN, IFLA_IFNAME, <const char *>raw, len(raw) + 1)
        off = _put_u32(self.sbuf, off, IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        cdef int err = self._exchange(off, WANT_ONE, out)
        if err == ENODEV:
            return None
        if err:
            raise _oserror(err, "RTM_GETLINK")
        return out[0] if out else None

    def dump_links(self):
        cdef list out = []
        cdef size_t off
        _header(self.sbuf, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, self._next_seq(), 0, 0, 0)
        off = _put_u32(self.sbuf, HDRLEN, IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        cdef int err = self._exchange(off, WANT_ALL, out)
        if err:
            raise _oserror(err, "RTM_GETLINK")
        return out

    def dump_tap_stats(self):
        """Every TAP's IFLA_STATS64 counters from one dump, the kernel asked to send only kind ``tun``."""
        cdef list out = []
        cdef char info[16]
        cdef size_t ilen = _put(info, 0, IFLA_INFO_KIND, b"tun\0", 4)
        _header(self.sbuf, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, self._next_seq(), 0, 0, 0)
        cdef size_t off = _put(self.sbuf, HDRLEN, IFLA_LINKINFO, info, ilen)
        cdef int err = self._exchange(off, WANT_TAP_STATS, out)
        if err:
            raise _oserror(err, "RTM_GETLINK")
        return out

    cdef size_t _build_setlink(self, int index, object name, object up, long mtu, object mac,
                               long master, object alias, long group) except 0:
        cdef bytes raw_name
        cdef bytes raw_mac
        cdef bytes raw_alias
        cdef size_t off
        if index <= 0:
            if name is None:
                raise ValueError("set_link needs an index or a name")
            raw_name = _ifname(name)
        if mac is not None:
            raw_mac = bytes(mac)
            if len(raw_mac) > 32:
                raise ValueError("hardware address too long")
        if alias is not None:
            raw_alias = (<str>alias).encode("utf-8")
            if len(raw_alias) >= IFALIASZ:
                raise ValueError("interface alias too long")
        if not (0 <= mtu <= 0xFFFFFFFF) or master > 0xFFFFFFFF or group > 0xFFFFFFFF:
            raise OverflowError("value out of range")
        _header(self.sbuf, RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, self._next_seq(),
                index if index > 0 else 0, IFF_UP if up else 0, IFF_UP if up is not None else 0)
        off = HDRLEN
        if index <= 0:
            off = _put(self.sbuf, off, IFLA_IFNAME, <const char *>raw_name, len(raw_name) + 1)
        if mac is not None:
            off = _put(self.sbuf, off, IFLA_ADDRESS, <const char *>raw_mac, len(raw_mac))
        if mtu > 0:
            off = _put_u32(self.sbuf, off, IFLA_MTU, <uint32_t>mtu)
        if master >= 0:
            off = _put_u32(self.sbuf, off, IFLA_MASTER, <uint32_t>master)
        if group >= 0:
            off = _put_u32(self.sbuf, off, IFLA_GROUP, <uint32_t>group)
        if alias is not None:
            off = _put(self.sbuf, off, IFLA_IFALIAS, <const char *>raw_alias, len(raw_alias))
        return off

    def set_link(self, int index=0, name=None, *, up=None, long mtu=0, mac=None,
                 long master=-1, alias=None, long group=-1):
        cdef size_t off = self._build_setlink(index, name, up, mtu, mac, master, alias, group)
        cdef int err = self._exchange(off, WANT_ACK, None)
        if err:
            raise _oserror(err, "RTM_SETLINK")

    def new_link(self, name, str kind):
        cdef bytes raw = _ifname(name)
        cdef bytes raw_kind = kind.encode("ascii")
        cdef char info[64]
        cdef size_t ilen
        if len(raw_kind) > 32:
            raise ValueError("link kind too long")
        ilen = _put(info, 0, IFLA_INFO_KIND, <const char *>raw_kind, len(raw_kind) + 1)
        _header(self.sbuf, RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                self._next_seq(), 0, 0, 0)
        cdef size_t off = _put(self.sbuf, HDRLEN, IFLA_IFNAME, <const char *>raw, len(raw) + 1)
        off = _put(self.sbuf, off, IFLA_LINKINFO, info, ilen)
        cdef int err = self._exchange(off, WANT_ACK, None)
        if err:
            raise _oserror(err, "RTM_NEWLINK")

    def del_link(self, int index=0, name=None, *, long group=-1):
        cdef bytes raw
        cdef size_t off = HDRLEN
        _header(self.sbuf, RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, self._next_seq(),
                index if index > 0 else 0, 0, 0)
        if index > 0:
            pass
        elif group > 0:
            if group > 0xFFFFFFFF:
                raise OverflowError("group out of range")
            off = _put_u32(self.sbuf, off, IFLA_GROUP, <uint32_t>group)
        elif name is not None:
            raw = _ifname(name)
            off = _put(self.sbuf, off, IFLA_IFNAME, <const char *>raw, len(raw) + 1)
        else:
            raise ValueError("del_link needs an index, a group or a name")
        cdef int err = self._exchange(off, WANT_ACK, None)
        if err:
            raise _oserror(err, "RTM_DELLINK")

    def add_tap(self, name, int tun_flags, long owner=-1, *, up=None, long mtu=0, mac=None,
                long master=-1, alias=None):
        """Create a persistent TAP, configured (one RTM_SETLINK) before TUNSETPERSIST.

        Until TUNSETPERSIST the device lives only as long as our fd: a crash or a
        failed RTM_SETLINK leaves nothing behind.
        """
        cdef bytes raw = _ifname(name)
        cdef char ifr[40]
        cdef int fd, rc, err = 0
        cdef unsigned short fl = <unsigned short>tun_flags
        cdef unsigned long uid = <unsigned long>owner if owner >= 0 else 0
        cdef int owner_step = 0
        cdef size_t off = self._build_setlink(0, name, up, mtu, mac, master, alias, -1)
        memset(ifr, 0, 40)
        memcpy(ifr, <const char *>raw, len(raw))
        memcpy(ifr + 16, &fl, 2)
        with nogil:
            fd = c_open(b"/dev/net/tun", O_RDWR | O_CLOEXEC)
            if fd < 0:
                err = errno
        if fd < 0:
            raise _oserror(err, "open")
        try:
            with nogil:
                rc = c_ioctl(fd, TUNSETIFF, ifr)
                if rc < 0:
                    err = errno
                elif owner >= 0:
                    owner_step = 1
                    rc = c_ioctl(fd, TUNSETOWNER, uid)
                    if rc < 0:
                        err = errno
            if rc < 0:
                raise _oserror(err, "TUNSETOWNER" if owner_step else "TUNSETIFF")
            err = self._exchange(off, WANT_ACK, None)
            if err:
                raise _oserror(err, "RTM_SETLINK")
            with nogil:
                rc = c_ioctl(fd, TUNSETPERSIST, <unsigned long>1)
                if rc < 0:
                    err = errno
            if rc < 0:
                raise _oserror(err, "TUNSETPERSIST")
        finally:
            with nogil:
                c_close(fd)

