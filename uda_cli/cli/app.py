"""The root Typer app and the error boundary every command goes through.

- pydantic validation errors print one ``error: <option>: <problem>`` line each, exit 2;
- a :class:`~uda_cli.errors.UDAError` prints its one line and exits with its code;
- usage errors from the parser print one line, exit 2;
- anything else is a bug: one line, exit 1, and ``UDA_DEBUG=1`` shows the traceback.

Exit statuses (the README lists them too): 0 success; 1 an error (a ``UDAError`` such as a
missing dataset, a bad checkpoint or an output that cannot be written, or an internal error); 2 bad options or usage; 130,
143, 138: a run stopped by SIGINT, SIGTERM or SIGUSR1 after writing a checkpoint (128 +
signal number). No command ever prompts: everything comes from flags, files and the
environment, so every command runs unattended.

Launched as one of several processes (``torchrun``, ``srun``), only rank 0 writes to
stdout; errors still reach stderr from every rank.

Nothing here imports torch: ``uda --help`` answers at once.
"""

from __future__ import annotations

import os
import sys

import typer
from pydantic import ValidationError

try:  # typer >= 0.25 vendors click; older releases depend on it
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as _cx

_EXIT = tuple({typer.Exit, getattr(_cx, "Exit", typer.Exit)})
_ABORT = tuple({typer.Abort, getattr(_cx, "Abort", typer.Abort)})

from uda_cli import __version__
from uda_cli.cli import adapt_images, download, evaluate, train, tsne
from uda_cli.config import validation_lines
from uda_cli.errors import UDAError

app = typer.Typer(
    name="uda",
    help="Unsupervised domain adaptation experiments: train, evaluate and compare published methods.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("download")(download.download)
app.command("train")(train.train)
app.command("adapt-images")(adapt_images.adapt_images)
app.command("evaluate")(evaluate.evaluate)
app.command("tsne")(tsne.tsne)


def _version(value: bool) -> None:
    if value:
        print(f"uda {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.")):
    """Unsupervised domain adaptation experiments: train, evaluate and compare published methods."""


def _err(msg: str) -> None:
    # soft_wrap: the line is never broken at the terminal width.
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, soft_wrap=True)
    for line in msg.splitlines() or [""]:
        console.print(f"[bold red]error:[/] {escape(line)}", highlight=False)


def _quiet_other_ranks() -> None:
    from uda_cli.engine.distributed import launched_rank  # no torch at import

    if launched_rank() > 0 and getattr(sys.stdout, "name", None) != os.devnull:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for the job


def _one_line_warnings() -> None:
    """A warning of ours (a dataset's odd files, counted once) prints as one ``warning:`` line,
    not Python's file:line and source echo; UDA_DEBUG=1 keeps Python's own format."""
    import warnings

    def fmt(message, category, filename, lineno, line=None):
        return f"warning: {message}\n"

    warnings.formatwarning = fmt


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("UDA_DEBUG") == "1"
    if not debug:
        _one_line_warnings()
    _quiet_other_ranks()
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="uda", standalone_mode=False)
    except _cx.NoArgsIsHelpError as e:  # `uda` alone: show the help
        print(e.format_message())
        sys.exit(0)
    except _EXIT as e:
        sys.exit(e.exit_code)
    except _ABORT:
        _err("aborted")
        sys.exit(130)
    except _cx.ClickException as e:
        if debug:
            raise
        _err(e.format_message().replace("\n", " "))
        sys.exit(2)
    except ValidationError as e:
        if debug:
            raise
        _err("\n".join(validation_lines(e)))
        sys.exit(2)
    except UDAError as e:
        if debug:
            raise
        _err(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        _err("interrupted; the run folder keeps its last complete checkpoint (continue with --resume auto)")
        sys.exit(130)
    except Exception as e:  # a bug: say so in one line
        if debug:
            raise
        first = (str(e).splitlines() or [""])[0]
        _err(f"internal error: {type(e).__name__}: {first} (set UDA_DEBUG=1 for the traceback and report it)")
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
