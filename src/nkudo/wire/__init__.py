"""Wire messages shared by the control plane and the edge agent.

Why one module for both sides: the control plane validates plan actions with
exactly the schema the agent's executor decodes, so a plan the agent would
refuse is refused at creation time (400) instead of failing on a host later.
``msgspec`` keeps decoding fast and strict (unknown fields are errors) while
adding almost nothing to the agent's footprint.

The codec names below load lazily, so importing the shared vocabulary
(:mod:`nkudo.wire.vocab`) from the CLI's fast start-up path does not load msgspec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nkudo.wire.codec import WireError, decode, encode

__all__ = ["WireError", "decode", "encode"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from nkudo.wire import codec

        return getattr(codec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
