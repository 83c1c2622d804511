"""Console-script entry point of ``nkudo-edge``: fast path first, click otherwise.

Both paths end the same way: a parser (``options.fast_parse`` or ``app.parse``,
built from the same table in :mod:`nkudo.cli.options`) gives ``(command, params)``,
:func:`dispatch` runs the command's runner, and every error is reported by
:mod:`nkudo.cli.output`. ``NKUDO_CLI_FORCE_CLICK=1`` skips the fast path: it exists
only so tests/host/test_cli_paths_equal.py can run each invocation through both
paths and compare them.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FORCE_CLICK_ENV = "NKUDO_CLI_FORCE_CLICK"


def dispatch(cmd: str, params: dict[str, Any]) -> int:
    """Run a parsed command: the one place both paths configure logging and call the runner."""
    from nkudo import log
    from nkudo.cli.commands import RUNNERS

    log.configure(params["log_level"], params["log_format"])
    rc = RUNNERS[cmd](params)
    sys.stdout.flush()  # here, so a closed pipe is reported like any error (not at interpreter exit)
    return rc


def main(argv: list[str] | None = None, *, force_click: bool = False) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        parsed: tuple[str, dict[str, Any]] | None = None
        if not force_click and os.environ.get(FORCE_CLICK_ENV) != "1":
            from nkudo.cli.options import fast_parse

            parsed = fast_parse(args)
        if parsed is None:
            from nkudo.cli.app import parse

            result = parse(args)
            if isinstance(result, int):  # --help, or a usage error already reported
                return result
            parsed = result
        return dispatch(*parsed)
    except (KeyboardInterrupt, Exception) as exc:
        from nkudo.cli.output import is_internal, report_exception

        if is_internal(exc) and ("--log-level=debug" in args or ("--log-level" in args and "debug" in args)):
            raise
        return report_exception(exc)


if __name__ == "__main__":
    sys.exit(main())
