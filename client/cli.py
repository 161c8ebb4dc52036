"""The `rnnserve` command: `rnnserve client ...`, plus the server's commands when installed.

    rnnserve client --address localhost:8001 step char_lstm --start --json '{"chars": 3}'
    rnnserve demo-model --output models                   # rnnserve[server]
    rnnserve serve --model-repository models --port 8001  # rnnserve[server]

This module is the client's: it imports nothing of the server. `serve` and
`demo-model` are found through the `rnnserve.commands` entry points (pyproject.toml);
when the server extra is not installed they answer how to install it, exit 2.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="rnnserve",
    help="gRPC serving for stateful recurrent Keras models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

NOT_INSTALLED = "the server is not installed: pip install 'rnnserve[server]'"


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


def _load_server_command(name: str) -> Any:
    """The `rnnserve.commands` entry point `name`, or None when its module cannot be
    imported (the server extra is not installed)."""
    for point in entry_points(group="rnnserve.commands", name=name):
        try:
            return point.load()
        except ImportError:
            return None
    return None


def _add_server_command(name: str, help_text: str) -> None:
    """`rnnserve NAME ...` runs the server's command NAME, loaded only when called: the
    client's commands never import the server."""

    @app.command(
        name,
        help=f"{help_text} (needs the server extra)",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        add_help_option=False,
    )
    def run(ctx: typer.Context) -> None:
        function = _load_server_command(name)
        if function is None:
            typer.echo(f"error: {NOT_INSTALLED}", err=True)
            raise typer.Exit(2)
        single = typer.Typer(pretty_exceptions_enable=False)
        single.command(name, **getattr(function, "__rnnserve_command__", {}))(function)
        typer.main.get_command(single).main(
            args=list(ctx.args), prog_name=f"rnnserve {name}", standalone_mode=True
        )


_add_server_command("serve", "Serve the models of a repository until SIGTERM, then drain")
_add_server_command("demo-model", "Train the demo char-LSTM and write it to a repository")


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
