"""Pure-Python twin of ``nkudo_native.kvm``, registered in ``nkudo._native``.

Why a module of its own: the loader hands callers the compiled module or this
one, so both must offer the same public names. The twin bodies live in
:mod:`nkudo.host.kvm` next to the constants and diagnosis they share.
"""

from __future__ import annotations

from nkudo.host.kvm import _probe_py as probe
from nkudo.host.kvm import _smoke_py as smoke

__all__ = ["probe", "smoke"]
