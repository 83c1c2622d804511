"""Pure-Python twin of ``nkudo_native.netlink``, registered in ``nkudo._native``.

Why a module of its own: the loader hands callers the compiled module or this
one, so both must offer the same public names; the implementation and its
helpers live in :mod:`nkudo.net._nlpy`.
"""

from __future__ import annotations

from nkudo.net._nlpy import NetlinkSocket

__all__ = ["NetlinkSocket"]
