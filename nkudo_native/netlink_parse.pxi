# Included by netlink.pyx (after its constants and attribute helpers): the RTM_NEWLINK decoders, kept in a
# file of their own so that netlink.pyx stays under 600 lines. Each is the twin of a function of
# nkudo.net.rtnl and must return exactly what that function returns.


cdef dict _parse_tun(const char *data, Py_ssize_t size):
    cdef const char *ptrs[NK_MAX_ATTR]
    cdef Py_ssize_t lens[NK_MAX_ATTR]
    _scan_attrs(data, size, 0, ptrs, lens)
    cdef const char *ttype = ptrs[IFLA_TUN_TYPE]
    cdef const char *owner = ptrs[IFLA_TUN_OWNER]
    cdef Py_ssize_t lt = lens[IFLA_TUN_TYPE], lo = lens[IFLA_TUN_OWNER]
    cdef const char *pi = ptrs[IFLA_TUN_PI]
    cdef const char *vnet = ptrs[IFLA_TUN_VNET_HDR]
    cdef const char *persist = ptrs[IFLA_TUN_PERSIST]
    cdef const char *mq = ptrs[IFLA_TUN_MULTI_QUEUE]
    cdef Py_ssize_t lp = lens[IFLA_TUN_PI], lv = lens[IFLA_TUN_VNET_HDR]
    cdef Py_ssize_t lper = lens[IFLA_TUN_PERSIST], lmq = lens[IFLA_TUN_MULTI_QUEUE]
    return {
        "type": "tap" if (ttype != NULL and lt > 0 and ttype[0] == IFF_TAP) else "tun",
        "owner": _u32(owner) if (owner != NULL and lo >= 4) else None,
        "pi": _flag(pi, lp),
        "vnet_hdr": _flag(vnet, lv),
        "persist": _flag(persist, lper),
        "multi_queue": _flag(mq, lmq),
    }


cdef dict _parse_link(const char *p, Py_ssize_t size):
    """Dict-for-dict twin of nkudo.net.rtnl.parse_link."""
    if size < 16:
        raise ValueError("truncated RTM_NEWLINK")
    cdef int32_t index
    cdef uint32_t flags
    memcpy(&index, p + 4, 4)
    memcpy(&flags, p + 8, 4)
    cdef const char *ptrs[NK_MAX_ATTR]
    cdef Py_ssize_t lens[NK_MAX_ATTR]
    _scan_attrs(p, size, 16, ptrs, lens)
    cdef const char *name = ptrs[IFLA_IFNAME]
    cdef const char *mac = ptrs[IFLA_ADDRESS]
    cdef const char *mtu = ptrs[IFLA_MTU]
    cdef const char *master = ptrs[IFLA_MASTER]
    cdef const char *oper = ptrs[IFLA_OPERSTATE]
    cdef const char *linkinfo = ptrs[IFLA_LINKINFO]
    cdef const char *alias = ptrs[IFLA_IFALIAS]
    cdef Py_ssize_t ln = lens[IFLA_IFNAME], lmac = lens[IFLA_ADDRESS], lmtu = lens[IFLA_MTU]
    cdef Py_ssize_t lmaster = lens[IFLA_MASTER], loper = lens[IFLA_OPERSTATE], linfo = lens[IFLA_LINKINFO]
    cdef Py_ssize_t lalias = lens[IFLA_IFALIAS]

    cdef object kind = None
    cdef object tun = None
    cdef const char *kptr = NULL
    cdef const char *dptr = NULL
    cdef Py_ssize_t lk = 0, ld = 0
    cdef const char *iptrs[NK_MAX_ATTR]
    cdef Py_ssize_t ilens[NK_MAX_ATTR]
    if linkinfo != NULL:
        _scan_attrs(linkinfo, linfo, 0, iptrs, ilens)
        kptr, lk = iptrs[IFLA_INFO_KIND], ilens[IFLA_INFO_KIND]
        dptr, ld = iptrs[IFLA_INFO_DATA], ilens[IFLA_INFO_DATA]
        if kptr != NULL:
            kind = _cstr(kptr, lk)
        if kind == "tun" and dptr != NULL:
            tun = _parse_tun(dptr, ld)

    cdef object mac_s = None
    cdef bytearray hexbuf
    cdef Py_ssize_t i
    cdef unsigned char b
    if mac != NULL and lmac > 0:
        hexbuf = bytearray(lmac * 3 - 1)
        for i in range(lmac):
            b = <unsigned char>mac[i]
            hexbuf[i * 3] = _HEX[b >> 4]
            hexbuf[i * 3 + 1] = _HEX[b & 15]
            if i + 1 < lmac:
                hexbuf[i * 3 + 2] = 58
        mac_s = hexbuf.decode("ascii")

    cdef str operstate = "unknown"
    if oper != NULL and loper > 0 and <unsigned char>oper[0] < 7:
        operstate = _OPERSTATES[<unsigned char>oper[0]]

    return {
        "index": index,
        "name": _cstr(name, ln) if name != NULL else "",
        "flags": flags,
        "up": bool(flags & IFF_UP),
        "mtu": _u32(mtu) if (mtu != NULL and lmtu >= 4) else None,
        "mac": mac_s,
        "master": _u32(master) if (master != NULL and lmaster >= 4) else None,
        "kind": kind,
        "operstate": operstate,
        "alias": _cstr(alias, lalias) if alias != NULL else None,
        "tun": tun,
    }


cdef object _parse_tap_stats(const char *p, Py_ssize_t size):
    """Tuple-for-tuple twin of nkudo.net.rtnl.parse_tap_stats (None for anything but a TAP with stats)."""
    if size < 16:
        raise ValueError("truncated RTM_NEWLINK")
    cdef int32_t index
    memcpy(&index, p + 4, 4)
    cdef const char *ptrs[NK_MAX_ATTR]
    cdef Py_ssize_t lens[NK_MAX_ATTR]
    cdef const char *iptrs[NK_MAX_ATTR]
    cdef Py_ssize_t ilens[NK_MAX_ATTR]
    cdef const char *tptrs[NK_MAX_ATTR]
    cdef Py_ssize_t tlens[NK_MAX_ATTR]
    _scan_attrs(p, size, 16, ptrs, lens)
    if ptrs[IFLA_LINKINFO] == NULL:
        return None
    _scan_attrs(ptrs[IFLA_LINKINFO], lens[IFLA_LINKINFO], 0, iptrs, ilens)
    cdef const char *kptr = iptrs[IFLA_INFO_KIND]
    if kptr == NULL or _cstr(kptr, ilens[IFLA_INFO_KIND]) != "tun" or iptrs[IFLA_INFO_DATA] == NULL:
        return None
    _scan_attrs(iptrs[IFLA_INFO_DATA], ilens[IFLA_INFO_DATA], 0, tptrs, tlens)
    if tptrs[IFLA_TUN_TYPE] == NULL or tlens[IFLA_TUN_TYPE] < 1 or tptrs[IFLA_TUN_TYPE][0] != IFF_TAP:
        return None
    cdef const char *st = ptrs[IFLA_STATS64]
    if st == NULL or lens[IFLA_STATS64] < 64:
        return None
    cdef uint64_t v[8]
    memcpy(v, st, 64)
    cdef const char *alias = ptrs[IFLA_IFALIAS]
    cdef const char *name = ptrs[IFLA_IFNAME]
    return (
        index,
        _cstr(name, lens[IFLA_IFNAME]) if name != NULL else "",
        _cstr(alias, lens[IFLA_IFALIAS]) if alias != NULL else None,
        (v[2], v[0], v[4], v[6], v[3], v[1], v[5], v[7]),
    )
