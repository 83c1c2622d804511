"""The click command tree of ``nkudo-edge``, built from :mod:`nkudo.cli.options`."""

from __future__ import annotations

import sys

import click

from nkudo.cli import options
from nkudo.cli.commands import RUNNERS

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


@click.group(context_settings=CONTEXT)
@_with_options(options.GLOBAL_OPTS)
@click.pass_context
def cli(ctx: click.Context, /, **params: Any) -> None:
    """nkudo edge agent: runs Cloud Hypervisor microVMs on this host."""
    from nkudo import log

    log.configure(params["log_level"], params["log_format"])
    ctx.obj = dict(params)


def _command(name: str, help_text: str) -> None:
    @cli.command(name=name, help=help_text, context_settings=CONTEXT)
    @_with_options(options.COMMAND_OPTS[name] + options.GLOBAL_OPTS_AFTER)
    @click.pass_obj
    def _cmd(obj: dict[str, Any], /, **params: Any) -> int:
        return RUNNERS[name](_merge_globals(obj, params))


def _merge_globals(obj: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The group's parameters overridden by global options given after the command (the later wins)."""
    after = {k: params.pop(k) for k in options.GLOBAL_NAMES}
    given = {k: v for k, v in after.items() if v is not None}
    merged = {**obj, **params, **given}
    if "log_level" in given or "log_format" in given:
        from nkudo import log

        log.configure(merged["log_level"], merged["log_format"])
    return merged


_command("version", "Print versions and which native modules are loaded.")
_command(
    "check",
    "Preflight: check that this host can run microVMs. Exit 0 when nothing failed (warnings allowed), 1 otherwise.",
)
_command("hostfacts", "Print the host facts sent with each heartbeat, as JSON.")
_command("enroll", "Enroll this host with a one-time token (creates the agent's key and certificate).")
_command(
    "run",
    "Run the agent: heartbeats, leased plans, results, logs, metrics. SIGTERM stops it cleanly; VMs keep running.",
)
_command("status", "Enrollment, certificate, last heartbeat and VM counts, from local state.")
_command(
    "unenroll",
    "Leave the control plane: revoke the certificate, remove credentials, delete (or keep) the VMs.",
)
_command("renew", "Renew the agent certificate now (within the renewal window unless --force).")
_command("verify-heartbeat", "One heartbeat round trip; exit 0 on success, 1 with the reason otherwise.")
_command(
    "apply",
    "Run a plan locally (no control plane): one line per action. Exit 0 only if every action succeeded.",
)


def run(argv: list[str]) -> int:
    """Run click without its own exit handling so errors get one line and our exit codes."""
    from nkudo.errors import NkudoError, UsageError

    try:
        rv = cli.main(args=argv, prog_name="nkudo-edge", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else "")
        return 0
    except click.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx else "nkudo-edge"
        sys.stderr.write(f"{cmd}: error: {exc.format_message()} (see '{cmd} --help')\n")
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        sys.stderr.write("nkudo-edge: aborted\n")
        return 1
    except UsageError as exc:
        sys.stderr.write(f"nkudo-edge: error: {exc.message} (see 'nkudo-edge --help')\n")
        return 2
    except NkudoError as exc:
        sys.stderr.write(f"nkudo-edge: error: {exc}\n")
        return 1
    except click.ClickException as exc:
        sys.stderr.write(f"nkudo-edge: error: {exc.format_message()}\n")
        return 1
    return rv if isinstance(rv, int) else 0
