"""Wire messages shared by the control plane and the edge agent.

Why one module for both sides: the control plane validates plan actions with
exactly the schema the agent's executor decodes, so a plan the agent would
refuse is refused at creation time (400) instead of failing on a host later.
``msgspec`` keeps decoding fast and strict (unknown fields are errors) while
adding almost nothing to the agent's footprint.
"""

from __future__ import annotations

from nkudo.wire.codec import WireError, decode, encode

__all__ = ["WireError", "decode", "encode"]
