"""The server's commands: `rnnserve serve` and `rnnserve demo-model`.

    rnnserve demo-model --output models
    rnnserve serve --model-repository models --port 8001

The `rnnserve` command itself is the client's (`rnnserve.client.cli`): it finds these
two through the `rnnserve.commands` entry points (pyproject.toml), so a client-only
install (`pip install rnnserve`, no server extra) still has `rnnserve client`, and
answers `serve` with how to install the server. Importing this module checks that the
server extra is installed (`ServerNotInstalled`) and imports nothing heavy.

Flags override `RNNSERVE_*` environment variables; both fill one `Settings`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

#: What `rnnserve[server]` adds that the server imports (top-level module names).
SERVER_MODULES = ("tensorflow", "keras", "redis", "pydantic_settings", "yaml", "prometheus_client")


class ServerNotInstalled(ImportError):
    """The server extra is missing: `pip install 'rnnserve[server]'`."""


def _require_server() -> None:
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ServerNotInstalled(
            f"the server is not installed (no {', '.join(missing)}): pip install 'rnnserve[server]'"
        )


_require_server()

F = TypeVar("F", bound=Callable[..., Any])


def command(**options: Any) -> Callable[[F], F]:
    """Marks a function as a `rnnserve` command; `options` are `typer`'s `command()`
    arguments, used by the client's `rnnserve` when it registers the entry point."""

    def mark(function: F) -> F:
        setattr(function, "__rnnserve_command__", options)  # noqa: B010 - a function attribute
        return function

    return mark


@command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Serve the models of a repository until SIGTERM, then drain.

    Every setting is a flag (`rnnserve serve --help` lists them) and an
    `RNNSERVE_*` environment variable; flags win.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "--help" in ctx.args or "-h" in ctx.args:
        print_serve_help()
        raise typer.Exit()
    from pydantic import ValidationError

    try:
        settings = settings_from_args(list(ctx.args))  # before the heavy imports: fast --help
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        typer.echo(f"error: invalid setting(s): {problems}", err=True)
        raise typer.Exit(2) from None
    from rnnserve.service.multiproc import MULTIPROC_ENV, claim_multiprocess_dir

    # Before any metric exists (logs imports them): dead processes' files go first.
    claim = claim_multiprocess_dir(os.environ.get(MULTIPROC_ENV))
    from rnnserve.service.logs import configure_logging, quiet_native_imports

    configure_logging(settings.log_level, json_lines=settings.log_json)
    if claim is not None:
        logging.getLogger("rnnserve.service.multiproc").info("metrics folder %s", claim.describe())
    from rnnserve.service.supervisor import (
        ProcessesError,
        Supervisor,
        exit_with_supervisor,
        process_count,
    )

    exit_with_supervisor()
    try:
        processes = process_count(settings)
    except ProcessesError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if processes > 1:  # the supervisor never imports the server (TensorFlow)
        raise typer.Exit(Supervisor(settings, processes).run())

    # TensorFlow's native INFO lines (absl, oneDNN, CUDA) whatever TF_CPP_MIN_LOG_LEVEL says.
    with quiet_native_imports(settings.log_level != "DEBUG"):
        from rnnserve.service.server import StartupError
        from rnnserve.service.server import serve as run_server

    try:
        asyncio.run(run_server(settings))
    except StartupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def print_serve_help() -> None:
    """`rnnserve serve --help`: the look of the other commands, listed from `Settings`."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from rnnserve.service.settings import option_rows

    console = Console()
    console.print()
    console.print(Text.assemble(" ", ("Usage: ", "yellow"), ("rnnserve serve [OPTIONS]", "bold")))
    console.print()
    console.print(" Serve the models of a repository until SIGTERM, then drain.")
    console.print()
    console.print(" Every option is also an environment variable (listed with it); flags win.")
    console.print()
    table = Table(show_header=False, box=None, expand=True, padding=(0, 1), highlight=True)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(style="bold yellow", no_wrap=True)
    table.add_column(ratio=1)
    for row in option_rows():
        help_text = Text(row.description)
        help_text.append(f"\n[env var: {row.env}]", style="dim")
        if row.default is not None:
            help_text.append(f"\n[default: {row.default}]", style="dim")
        table.add_row(row.flag, f"<{row.kind}>", help_text)
    table.add_row("--help", "", Text("Show this message and exit."))
    console.print(Panel(table, title="Options", title_align="left", border_style="dim"))


def settings_from_args(args: list[str]) -> Any:
    """`Settings` from env and `--kebab-case` flags (pydantic-settings' own CLI parser)."""
    from rnnserve.service.settings import Settings

    return Settings(_cli_parse_args=args, _cli_kebab_case=True, _cli_prog_name="rnnserve serve")


@command()
def demo_model(
    output: Annotated[Path, typer.Option(help="repository folder to write")] = Path("models"),
    epochs: Annotated[int, typer.Option(help="training epochs")] = 3,
) -> None:
    """Train the small character-level LSTM and write it as `<output>/char_lstm/1/`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from rnnserve.core.demo import train_char_lstm

    with Progress(SpinnerColumn(), TextColumn("{task.description}")) as progress:
        task = progress.add_task(f"training the demo char-LSTM ({epochs} epochs)", total=None)
        model = train_char_lstm(epochs=epochs)
        progress.update(task, description="saving")
        folder = output / "char_lstm" / "1"
        folder.mkdir(parents=True, exist_ok=True)
        model.save(folder / "model.keras")
        write_char_config(folder)
    typer.echo(f"wrote {folder / 'model.keras'}")


def write_char_config(folder: Path) -> None:
    """The demo model's `config.yaml`: its limits, and its vocabulary (the characters in
    token order) as signature metadata, which `rnnserve client generate` reads."""
    import yaml

    from rnnserve.core.demo import VOCABULARY

    config = {
        "max_batch_size": 64,
        "idle_timeout_s": 3600,
        "metadata": {"vocabulary": "".join(VOCABULARY)},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def server_app() -> typer.Typer:
    """The server's commands alone: `python -m rnnserve.service.cli serve ...` (how the
    supervisor starts its processes; `rnnserve serve` is the same command)."""
    app = typer.Typer(
        name="rnnserve", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False
    )
    for name, function in (("serve", serve), ("demo-model", demo_model)):
        app.command(name, **getattr(function, "__rnnserve_command__", {}))(function)
    return app


if __name__ == "__main__":
    server_app()()
