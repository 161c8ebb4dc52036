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


@app.command()
def serve(
    model_repository: Annotated[
        Path | None, typer.Option(help="folder of <name>/<version>/model.keras")
    ] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port (0: any free port)")] = None,
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus /metrics port")] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="redis://host:port/db (default: embedded memory store)")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="largest batch per model call")] = None,
    repository_poll_s: Annotated[
        float | None, typer.Option(help="re-scan the repository every N seconds")
    ] = None,
    log_json: Annotated[bool | None, typer.Option(help="JSON log lines")] = None,
) -> None:
    """Serve the models of a repository until SIGTERM, then drain."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from rnnserve.service.logs import configure_logging
    from rnnserve.service.server import serve as run_server
    from rnnserve.service.settings import Settings

    flags: dict[str, Any] = {
        "model_repository": model_repository,
        "port": port,
        "host": host,
        "metrics_port": metrics_port,
        "redis_url": redis_url,
        "max_batch_size": max_batch_size,
        "repository_poll_s": repository_poll_s,
        "log_json": log_json,
    }
    settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    configure_logging(settings.log_level, json_lines=settings.log_json)
    asyncio.run(run_server(settings))


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
