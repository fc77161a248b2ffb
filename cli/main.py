"""The ``pyro-lag`` command: a click group whose user errors are one line and a non-zero exit.

Every subcommand lives in its own module; this one only assembles them and turns the
library's user-facing exceptions (bad files, bad settings, unknown names) into
``Error: ...`` on stderr without a traceback. Set ``PYRO_LAG_TRACEBACK=1`` to see the
full traceback of such an error instead.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

import click

from .errors import USER_ERRORS, one_line


class PyroLagGroup(click.Group):
    """A click group that reports every error, usage errors included, as a single line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise
        except USER_ERRORS as exc:
            if os.environ.get("PYRO_LAG_TRACEBACK"):
                raise
            raise click.ClickException(one_line(exc)) from None

    def main(  # type: ignore[override]
        self,
        args: Optional[Sequence[str]] = None,
        prog_name: Optional[str] = None,
        complete_var: Optional[str] = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `pyro-lag`: the help text
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Error: aborted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # output piped into a reader that stopped (`| head`): not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=PyroLagGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pyro-lag", prog_name="pyro-lag")
def main() -> None:
    """Aggressive inference-network training for Pyro VAEs (He et al., ICLR 2019).

    Train with `pyro-lag fit` (no argument: the paper's synthetic experiment), then
    inspect a run directory with `eval`, `report`, `sample` and `compare`.
    Errors are one line; set PYRO_LAG_TRACEBACK=1 to see the full traceback.
    """


def _register() -> None:
    from .commands import compare_cmd, data_cmd, eval_cmd, models_cmd, report_cmd, sample_cmd
    from .fit_cmd import fit_cmd

    for command in (fit_cmd, eval_cmd, report_cmd, sample_cmd, compare_cmd, models_cmd, data_cmd):
        main.add_command(command)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
