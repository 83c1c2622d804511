"""``nkudo-edge console VM_ID [--follow] [--lines N]``: a VM's serial console, safe to print.

Reads the VM's ``console.log`` (and ``console.log.1``, the previous VMM run's) from the runtime
directory; it needs neither the control plane nor the agent to be running. Every byte printed went
through :func:`nkudo.agent.console.sanitize`: a guest cannot drive the operator's terminal.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from nkudo.errors import NkudoError, ValidationError
from nkudo.wire.vocab import ErrorCode


def run_console(p: dict[str, Any]) -> int:
    from nkudo.agent import console
    from nkudo.agent import paths as P

    vm_id = p["vm_id"]
    lines = p["lines"]
    if not 1 <= lines <= console.MAX_LINES:
        raise ValidationError(f"--lines must be between 1 and {console.MAX_LINES} (got {lines})", field="--lines")
    if not os.path.isdir(p["runtime_dir"]):
        raise NkudoError(f"--runtime-dir {p['runtime_dir']} does not exist", code=ErrorCode.FILE_NOT_FOUND,
                         field="--runtime-dir")  # fmt: skip
    d = P.safe_join(p["runtime_dir"], vm_id, field="VM_ID")
    cur, prev = console.console_paths(d)
    if not os.path.isdir(d):
        raise NkudoError(f"VM {vm_id!r} has no runtime directory under {p['runtime_dir']} (not on this host?)",
                         code=ErrorCode.VM_NOT_FOUND, field="VM_ID")  # fmt: skip
    if not (os.path.exists(cur) or os.path.exists(prev)) and not p["follow"]:
        raise NkudoError(f"VM {vm_id!r} has no console log yet (its VMM never started)",
                         code=ErrorCode.FILE_NOT_FOUND, field="VM_ID")  # fmt: skip
    out = sys.stdout
    mark = console.position(d)  # the tail ends here and the follow starts here: nothing twice, nothing lost
    out.write(console.tail_text(d, lines, end=mark))
    out.flush()
    if not p["follow"]:
        return 0
    # SIGTERM ends a follow as cleanly as Ctrl-C does (exit 0: following was asked for, not a failure).
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        for chunk in console.follow(d, start=mark or (-1, 0), stop=lambda: bool(stopping)):
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        pass
    return 0
