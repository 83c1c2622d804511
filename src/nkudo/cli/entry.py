"""Console-script entry point of ``nkudo-edge``: fast path first, click otherwise."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        from nkudo.cli.options import fast_parse

        fast = fast_parse(args)
        if fast is not None:
            from nkudo import log
            from nkudo.cli.commands import RUNNERS

            cmd, params = fast
            log.configure(params["log_level"], params["log_format"])
            return RUNNERS[cmd](params)
        from nkudo.cli.app import run

        return run(args)
    except KeyboardInterrupt:
        sys.stderr.write("nkudo-edge: interrupted\n")
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # last resort: one line, never a traceback for operators
        from nkudo.errors import NkudoError, UsageError

        if isinstance(exc, UsageError):
            sys.stderr.write(f"nkudo-edge: error: {exc.message} (see 'nkudo-edge --help')\n")
            return 2
        if isinstance(exc, NkudoError):
            sys.stderr.write(f"nkudo-edge: error: {exc}\n")
            return 1
        if "--log-level=debug" in args or ("--log-level" in args and "debug" in args):
            raise
        sys.stderr.write(
            f"nkudo-edge: internal error: {type(exc).__name__}: {exc} (rerun with --log-level debug for details)\n"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
