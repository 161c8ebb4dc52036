"""The `rnnserve` command: serve, demo-model, client.

    rnnserve demo-model --output models
    rnnserve serve --model-repository models --port 8001
    rnnserve client --address localhost:8001 step char_lstm --json '{"chars": 3}'

Flags override `RNNSERVE_*` environment variables; both fill one `Settings`.
"""

from __future__ import annotations

import asyncio
import logging
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


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"rnnserve {version('rnnserve')}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """gRPC serving for stateful recurrent Keras models."""


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


# -- rnnserve client ---------------------------------------------------------------------
client_app = typer.Typer(
    name="client",
    help="Talk to a running server: models, signatures, sessions, steps, sequences.",
    no_args_is_help=True,
)
app.add_typer(client_app, name="client")

# A sequence at least this long gets a progress bar (on stderr).
PROGRESS_MIN_STEPS = 64


@client_app.callback()
def client(
    ctx: typer.Context,
    address: Annotated[
        list[str],
        typer.Option(
            envvar="RNNSERVE_ADDRESS",
            help="host:port of a server; repeat (or comma-separate) for replicas to fail over to",
        ),
    ] = ["localhost:8001"],  # noqa: B006 - typer reads the default, nothing mutates it
    token: Annotated[
        str | None, typer.Option(envvar="RNNSERVE_TOKEN", help="bearer token (auth enabled)")
    ] = None,
    tls: Annotated[bool, typer.Option(help="TLS with the system's root certificates")] = False,
    ca_file: Annotated[
        Path | None, typer.Option(help="CA certificate (PEM) to trust; implies --tls")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds per call attempt")] = 30.0,
) -> None:
    """Options shared by every `rnnserve client` command."""
    ctx.obj = {
        "addresses": [a for item in address for a in item.split(",") if a.strip()],
        "token": token,
        "tls": tls,
        "ca_file": ca_file,
        "timeout": timeout,
    }


def _connect(ctx: typer.Context) -> Any:
    import grpc

    from rnnserve.client import Client

    options = ctx.obj
    tls: Any = options["tls"]
    if options["ca_file"] is not None:
        tls = grpc.ssl_channel_credentials(root_certificates=options["ca_file"].read_bytes())
    return Client(options["addresses"], token=options["token"], tls=tls, timeout=options["timeout"])


def _print_json(value: Any) -> None:
    import json

    typer.echo(json.dumps(value))


def _jsonable(session: Any, outputs: Any) -> dict[str, Any]:
    """Outputs by name as lists (a one-output model's array gets its name back)."""
    if not isinstance(outputs, dict):
        outputs = {session.signature.outputs[0].name: outputs}
    return {name: value.tolist() for name, value in outputs.items()}


def _fail(exc: Exception) -> typer.Exit:
    code = getattr(exc, "code", None)
    prefix = f"{code.name}: " if code is not None else ""
    typer.echo(f"error: {prefix}{exc}", err=True)
    return typer.Exit(1)


def _open_session(
    client: Any, model: str, session_id: str | None, version: str | None, constants: str | None
) -> Any:
    """Attach to `session_id` if it exists, else start it (a new id when None)."""
    import json

    from rnnserve.client import NotFound

    if session_id is not None and constants is None:
        try:
            return client.attach(model, session_id)
        except NotFound:
            pass
    return client.session(
        model,
        session_id,
        version=version,
        constants=json.loads(constants) if constants is not None else None,
    )


def _load_sequence(path: Path) -> Any:
    """`.npy` (one input), `.npz` (arrays by input name) or `.json` (a list or a dict)."""
    import json

    import numpy as np

    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            return {name: arrays[name] for name in arrays.files}
    return json.loads(path.read_text())


@client_app.command("models")
def client_models(ctx: typer.Context) -> None:
    """List the served models and their versions (JSON)."""
    from rnnserve.client import ClientError

    try:
        with _connect(ctx) as client:
            models = client.list_models()
    except ClientError as exc:
        raise _fail(exc) from exc
    _print_json(
        [
            {"name": m.name, "versions": list(m.versions), "default_version": m.default_version}
            for m in models
        ]
    )


@client_app.command("signature")
def client_signature(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[str | None, typer.Option(help="default: the latest loaded")] = None,
) -> None:
    """A model's step signature: inputs, constants, states, outputs (JSON)."""
    from rnnserve.client import ClientError

    try:
        with _connect(ctx) as client:
            _print_json(client.signature(model, version).to_dict())
    except ClientError as exc:
        raise _fail(exc) from exc


@client_app.command("start")
def client_start(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="model name")],
    session_id: Annotated[str | None, typer.Option("--session", help="default: a new id")] = None,
    version: Annotated[str | None, typer.Option(help="default: the latest loaded")] = None,
    constants: Annotated[
        str | None, typer.Option(help="JSON constants by name, e.g. '{\"context\": [1, 0]}'")
    ] = None,
) -> None:
    """Start (or restart) a session; prints its id and seq (JSON)."""
    import json

    from rnnserve.client import ClientError

    try:
        with _connect(ctx) as client:
            session = client.session(
                model,
                session_id,
                version=version,
                constants=json.loads(constants) if constants is not None else None,
            )
    except ClientError as exc:
        raise _fail(exc) from exc
    _print_json({"session_id": session.session_id, "version": session.version, "seq": session.seq})


@client_app.command("step")
def client_step(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="model name")],
    json_input: Annotated[
        str, typer.Option("--json", help="one step's inputs, e.g. '{\"chars\": 3}'")
    ],
    session_id: Annotated[
        str | None, typer.Option("--session", help="continue this session (default: a new one)")
    ] = None,
    version: Annotated[str | None, typer.Option(help="for a new session")] = None,
    constants: Annotated[str | None, typer.Option(help="JSON constants for a new session")] = None,
) -> None:
    """One step of a session; prints session id, seq and outputs (JSON)."""
    import json

    from rnnserve.client import ClientError

    try:
        with _connect(ctx) as client:
            session = _open_session(client, model, session_id, version, constants)
            outputs = session.step(json.loads(json_input))
    except ClientError as exc:
        raise _fail(exc) from exc
    _print_json(
        {
            "session_id": session.session_id,
            "seq": session.seq,
            "replayed": session.last_replayed,
            "outputs": _jsonable(session, outputs),
        }
    )


@client_app.command("run")
def client_run(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="model name")],
    input_file: Annotated[
        Path,
        typer.Option(
            "--input", exists=True, dir_okay=False, help=".npy, .npz or .json: (T, ...) per input"
        ),
    ],
    session_id: Annotated[
        str | None, typer.Option("--session", help="continue this session (default: a new one)")
    ] = None,
    version: Annotated[str | None, typer.Option(help="for a new session")] = None,
    constants: Annotated[str | None, typer.Option(help="JSON constants for a new session")] = None,
    end: Annotated[bool, typer.Option(help="end the session afterwards")] = False,
) -> None:
    """Run a whole sequence through a session; prints all outputs, (T, ...) each (JSON)."""
    from rich.console import Console
    from rich.progress import Progress

    from rnnserve.client import ClientError

    xs = _load_sequence(input_file)
    try:
        with _connect(ctx) as client:
            session = _open_session(client, model, session_id, version, constants)
            first = xs[session.signature.inputs[0].name] if isinstance(xs, dict) else xs
            total = len(first)
            with Progress(
                console=Console(stderr=True),
                transient=True,
                disable=total < PROGRESS_MIN_STEPS,
            ) as progress:
                task = progress.add_task(f"{model}: {total} steps", total=total)
                outputs = session.run(
                    xs, on_step=lambda done, _: progress.update(task, completed=done)
                )
            if end:
                session.end()
    except ClientError as exc:
        raise _fail(exc) from exc
    _print_json(
        {
            "session_id": session.session_id,
            "seq": session.seq,
            "outputs": _jsonable(session, outputs),
        }
    )


@client_app.command("info")
def client_info(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="model name")],
    session_id: Annotated[str, typer.Argument(help="session id")],
) -> None:
    """A session's model version, seq and expiry (JSON)."""
    import dataclasses

    from rnnserve.client import ClientError

    try:
        with _connect(ctx) as client:
            info = client.attach(model, session_id).info()
    except ClientError as exc:
        raise _fail(exc) from exc
    _print_json(dataclasses.asdict(info))


@client_app.command("end")
def client_end(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="model name")],
    session_id: Annotated[str, typer.Argument(help="session id")],
) -> None:
    """End (delete) a session."""
    from rnnserve.client import Client, ClientError

    try:
        with _connect(ctx) as client:
            assert isinstance(client, Client)
            existed = client.attach(model, session_id).end()
    except ClientError as exc:
        raise _fail(exc) from exc
    _print_json({"existed": existed})


@client_app.command("generate")
def client_generate(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="a character model, e.g. char_lstm")] = "char_lstm",
    prompt: Annotated[str, typer.Option(help="text fed first, one character per step")] = (
        "serving "
    ),
    length: Annotated[int, typer.Option(min=1, help="characters to generate")] = 40,
    vocabulary: Annotated[
        Path | None,
        typer.Option(help="characters in token order (default: models/<model>/vocabulary.txt)"),
    ] = None,
) -> None:
    """Greedy text generation with a character model (the demo char-LSTM).

    The prompt runs as one sequence; then each most likely next character is fed
    back one step at a time. Characters map to token ids through the vocabulary
    file `demo-model` writes next to the model.
    """
    import numpy as np

    from rnnserve.client import ClientError

    path = vocabulary or Path("models") / model / "vocabulary.txt"
    if not path.is_file():
        typer.echo(f"error: no vocabulary file {path} (pass --vocabulary)", err=True)
        raise typer.Exit(1)
    chars = path.read_text()
    index = {ch: i for i, ch in enumerate(chars)}
    unknown = sorted(set(prompt) - set(index))
    if not prompt or unknown:
        typer.echo(f"error: the prompt needs characters of the vocabulary {chars!r}", err=True)
        raise typer.Exit(1)
    try:
        with _connect(ctx) as client, client.session(model) as session:
            logits = np.asarray(session.run(np.array([index[c] for c in prompt])))[-1]
            produced: list[str] = []
            for i in range(length):
                token = int(np.argmax(logits))
                produced.append(chars[token])
                if i < length - 1:
                    logits = np.asarray(session.step(token))
    except ClientError as exc:
        raise _fail(exc) from exc
    typer.echo(prompt + "".join(produced))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
