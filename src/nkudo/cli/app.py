"""The click command tree of ``nkudo-edge``, built from the table in :mod:`nkudo.cli.options`.

click only parses here (help, usage errors, values); the command runs in
:func:`nkudo.cli.entry.dispatch`, the same place the fast path runs it.
"""

from __future__ import annotations

import sys

import click

from nkudo.cli import options

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _SpecType(click.ParamType):  # type: ignore[type-arg]
    """click type that delegates to the shared converter (same messages on both paths)."""

    def __init__(self, opt: options.Opt) -> None:
        self.opt = opt
        self.name = opt.kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return options.convert(self.opt, value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _click_option(o: options.Opt) -> Callable[[Any], Any]:
    kw: dict[str, Any] = {"help": o.help, "show_default": True, "show_envvar": o.envvar is not None}
    if o.envvar:
        kw["envvar"] = o.envvar
    if o.is_flag:
        return click.option(o.flag, o.name, is_flag=True, default=o.default, **kw)
    if o.choices is not None:
        kw["type"] = click.Choice(o.choices)
    else:
        kw["type"] = _SpecType(o)
    if o.required:
        return click.option(o.flag, o.name, required=True, multiple=o.multiple, **kw)
    return click.option(o.flag, o.name, default=o.default, multiple=o.multiple, **kw)


def _with_options(specs: tuple[options.Opt, ...]) -> Callable[[Any], Any]:
    def deco(f: Any) -> Any:
        for o in reversed(specs):
            f = _click_option(o)(f)
        return f

    return deco


@click.group(context_settings=CONTEXT, help=options.PROG_HELP)
@_with_options(options.GLOBAL_OPTS)
@click.pass_context
def cli(ctx: click.Context, /, **params: Any) -> None:
    ctx.obj = dict(params)


def _command(spec: options.Command) -> None:
    """A click command that only parses: it returns ``(name, params)`` for :func:`entry.dispatch`."""

    @click.pass_obj
    def _cmd(obj: dict[str, Any], /, **params: Any) -> tuple[str, dict[str, Any]]:
        return spec.name, _merge_globals(obj, params)

    for arg in reversed(spec.args):
        _cmd = click.argument(arg.lower(), metavar=arg)(_cmd)
    _cmd = _with_options(spec.opts + options.GLOBAL_OPTS_AFTER)(_cmd)
    cli.command(name=spec.name, help=spec.help, context_settings=CONTEXT)(_cmd)


def _merge_globals(obj: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The group's parameters overridden by global options given after the command (the later wins)."""
    after = {k: params.pop(k) for k in options.GLOBAL_NAMES}
    given = {k: v for k, v in after.items() if v is not None}
    return {**obj, **params, **given}


for _spec in options.COMMANDS.values():
    _command(_spec)


def parse(argv: list[str]) -> tuple[str, dict[str, Any]] | int:
    """Parse ``argv`` with click: ``(command, params)`` to run, or the exit code of ``--help`` or of a
    usage error (already reported). Runs nothing, so the commands run outside click's own handling
    of interrupts and closed pipes, exactly as on the fast path."""
    from nkudo.cli import output

    try:
        rv = cli.main(args=argv, prog_name=output.PROG, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else "")
        return output.ExitCode.OK
    except click.UsageError as exc:
        return output.report_usage(exc.format_message(), exc.ctx.command_path if exc.ctx else output.PROG)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):
            raise exc.__cause__ from None
        sys.stderr.write(f"{output.PROG}: aborted\n")
        return output.ExitCode.FAILURE
    except click.ClickException as exc:
        sys.stderr.write(f"{output.PROG}: error: {exc.format_message()}\n")
        return output.ExitCode.FAILURE
    if isinstance(rv, tuple):
        return rv
    return rv if isinstance(rv, int) else output.ExitCode.OK


