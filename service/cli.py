"""The `rnnserve` command: serve, demo-model, client.

    rnnserve demo-model --output models
    rnnserve serve --model-repository models --port 8001
    rnnserve client --address localhost:8001 step char_lstm --json '{"chars": 3}'

Flags override `RNNSERVE_*` environment variables; both fill one `Settings`.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="rnnserve",
    help="gRPC serving for stateful recurrent Keras models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Serve the models of a repository until SIGTERM, then drain.

    Every setting is a flag (`rnnserve serve --help` lists them) and an
    `RNNSERVE_*` environment variable; flags win.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    settings = settings_from_args(list(ctx.args))  # before the heavy imports: fast --help
    from rnnserve.service.logs import configure_logging
    from rnnserve.service.server import serve as run_server

    configure_logging(settings.log_level, json_lines=settings.log_json)
    asyncio.run(run_server(settings))


def settings_from_args(args: list[str]) -> Any:
    """`Settings` from env and `--kebab-case` flags (pydantic-settings' own CLI parser)."""
    from rnnserve.service.settings import Settings

    return Settings(_cli_parse_args=args, _cli_kebab_case=True, _cli_prog_name="rnnserve serve")


@app.command("demo-model")
def demo_model(
    output: Annotated[Path, typer.Option(help="repository folder to write")] = Path("models"),
    epochs: Annotated[int, typer.Option(help="training epochs")] = 3,
) -> None:
    """Train the small character-level LSTM and write it as `<output>/char_lstm/1/`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from rnnserve.core.demo import VOCABULARY, train_char_lstm

    with Progress(SpinnerColumn(), TextColumn("{task.description}")) as progress:
        task = progress.add_task(f"training the demo char-LSTM ({epochs} epochs)", total=None)
        model = train_char_lstm(epochs=epochs)
        progress.update(task, description="saving")
        folder = output / "char_lstm" / "1"
        folder.mkdir(parents=True, exist_ok=True)
        model.save(folder / "model.keras")
        (folder / "config.yaml").write_text("max_batch_size: 64\nidle_timeout_s: 3600\n")
        (output / "char_lstm" / "vocabulary.txt").write_text("".join(VOCABULARY))
    typer.echo(f"wrote {folder / 'model.keras'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
