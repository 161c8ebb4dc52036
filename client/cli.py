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
        single = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
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
        try:
            roots = options["ca_file"].read_bytes()
        except OSError as exc:
            raise _usage(f"--ca-file {options['ca_file']}: {exc.strerror or exc}") from None
        tls = grpc.ssl_channel_credentials(root_certificates=roots)
    return Client(options["addresses"], token=options["token"], tls=tls, timeout=options["timeout"])


def _print_json(value: Any) -> None:
    import json

    typer.echo(json.dumps(value))


def _jsonable(session: Any, outputs: Any) -> dict[str, Any]:
    """Outputs by name as lists (a one-output model's array gets its name back)."""
    if not isinstance(outputs, dict):
        outputs = {session.signature.outputs[0].name: outputs}
    return {name: value.tolist() for name, value in outputs.items()}


def _usage(message: str) -> typer.Exit:
    """A mistake in the command (its options, its input): one line, exit 2."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _fail(exc: Exception, note: str = "") -> typer.Exit:
    """A `ClientError`: exit 1 with the status code for what the server answered, exit 2
    for what the client refused before sending (a value that does not convert, ...)."""
    code = getattr(exc, "code", None)
    prefix = f"{code.name}: " if code is not None else ""
    typer.echo(f"error: {prefix}{exc}{note}", err=True)
    return typer.Exit(1 if code is not None else 2)


def _json_option(text: str | None, option: str) -> Any:
    """The value of a JSON option (None when not given); bad JSON is a usage error."""
    import json

    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _usage(f"{option}: not valid JSON ({exc})") from None


def _open_session(
    client: Any,
    model: str,
    session_id: str | None,
    *,
    start: bool,
    version: str | None,
    constants: Any,
    inputs: Any,
) -> tuple[Any, bool]:
    """(session, started): a new session when no id is given (or, with `start`, when the
    id does not exist); else the existing one, which must not be given constants or
    another version (they only apply to a new session). `inputs` (one step, or a
    sequence) are converted first, so a value the model cannot take starts nothing."""
    from rnnserve.client import NotFound
    from rnnserve.client._models import encode_named

    if session_id is not None:
        try:
            session = client.attach(model, session_id)
        except NotFound as exc:
            if not start:
                raise _fail(exc, "; pass --start to start it") from None
        else:
            if constants is not None:
                raise _usage(
                    f"session {session_id!r} is live (seq {session.seq}): --constants apply "
                    f"to a new session only; restart it with new ones: rnnserve client "
                    f"reset {model} {session_id} --constants '...'"
                )
            if version is not None and version != session.version:
                raise _usage(
                    f"session {session_id!r} is live on version {session.version!r}: "
                    "--version applies to a new session only; end it (rnnserve client end "
                    f"{model} {session_id}) and start it again with --version {version}"
                )
            return session, False
    signature = client.signature(model, version)
    encode_named(signature.inputs, inputs, role="input")  # InvalidRequest: nothing started
    started = client.session(model, session_id, version=signature.version, constants=constants)
    return started, True


def _ended_note(client: Any, session: Any, started: bool) -> str:
    """After a failed call: end the session this command started for it, and say so."""
    from rnnserve.client import ClientError

    if not started:
        return ""
    try:
        client.end_session(session.model, session.session_id)
    except ClientError:
        return f" (the session {session.session_id!r} started for this call was left behind)"
    return f" (the session {session.session_id!r} started for this call was ended)"


def _load_sequence(path: Path) -> Any:
    """`.npy` (one input), `.npz` (arrays by input name) or `.json` (a list or a dict);
    anything unreadable, or no steps at all, is a usage error."""
    import json

    import numpy as np

    try:
        if path.suffix == ".npy":
            xs: Any = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                xs = {name: arrays[name] for name in arrays.files}
        else:
            xs = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise _usage(f"--input {path}: cannot read it ({exc})") from None
    first = next(iter(xs.values()), []) if isinstance(xs, dict) else xs
    try:
        steps = 0 if isinstance(first, str) else len(first)
    except TypeError:  # a number, a 0-d array
        steps = 0
    if steps == 0:
        raise _usage(f"--input {path}: no steps (a sequence is (T, ...) per input, T >= 1)")
    return xs


JsonOption = Annotated[str | None, typer.Option(help="JSON constants for a new session")]
SessionOption = Annotated[
    str | None,
    typer.Option("--session", help="an existing session (default: a new one; see --start)"),
]
StartOption = Annotated[
    bool, typer.Option("--start", help="start the --session id if it does not exist")
]
VersionOption = Annotated[
    str | None, typer.Option(help="model version of a new session (default: the latest)")
]
ModelArgument = Annotated[str, typer.Argument(help="model name")]
SessionArgument = Annotated[str, typer.Argument(help="session id")]


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
    model: ModelArgument,
    version: Annotated[str | None, typer.Option(help="default: the latest loaded")] = None,
) -> None:
    """A model's step signature: inputs, constants, states, outputs, metadata (JSON)."""
    from rnnserve.client import ClientError

    try:
        with _connect(ctx) as client:
            _print_json(client.signature(model, version).to_dict())
    except ClientError as exc:
        raise _fail(exc) from exc


@client_app.command("start")
def client_start(
    ctx: typer.Context,
    model: ModelArgument,
    session_id: Annotated[str | None, typer.Option("--session", help="default: a new id")] = None,
    version: VersionOption = None,
    constants: Annotated[
        str | None, typer.Option(help="JSON constants by name, e.g. '{\"context\": [1, 0]}'")
    ] = None,
) -> None:
    """Start a new session; prints its id, version and seq (JSON).

    An id that is already a session is refused: `reset` restarts one.
    """
    from rnnserve.client import ClientError, NotFound

    values = _json_option(constants, "--constants")
    try:
        with _connect(ctx) as client:
            if session_id is not None:
                try:
                    live = client.attach(model, session_id)
                except NotFound:
                    pass
                else:
                    raise _usage(
                        f"session {session_id!r} exists (seq {live.seq}); restart it with "
                        f"rnnserve client reset {model} {session_id}"
                    )
            session = client.session(model, session_id, version=version, constants=values)
    except ClientError as exc:
        raise _fail(exc) from exc
    _print_json({"session_id": session.session_id, "version": session.version, "seq": session.seq})


@client_app.command("step")
def client_step(
    ctx: typer.Context,
    model: ModelArgument,
    json_input: Annotated[
        str, typer.Option("--json", help="one step's inputs, e.g. '{\"chars\": 3}'")
    ],
    session_id: SessionOption = None,
    start: StartOption = False,
    version: VersionOption = None,
    constants: JsonOption = None,
) -> None:
    """One step of a session; prints session id, seq and outputs (JSON).

    Without --session a new session is started; a call that fails ends it again.
    """
    from rnnserve.client import ClientError

    x = _json_option(json_input, "--json")
    values = _json_option(constants, "--constants")
    try:
        with _connect(ctx) as client:
            session, started = _open_session(
                client, model, session_id, start=start, version=version, constants=values, inputs=x
            )
            try:
                outputs = session.step(x)
            except ClientError as exc:
                raise _fail(exc, _ended_note(client, session, started)) from exc
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
    model: ModelArgument,
    input_file: Annotated[
        Path,
        typer.Option(
            "--input", exists=True, dir_okay=False, help=".npy, .npz or .json: (T, ...) per input"
        ),
    ],
    session_id: SessionOption = None,
    start: StartOption = False,
    version: VersionOption = None,
    constants: JsonOption = None,
    end: Annotated[bool, typer.Option(help="end the session afterwards")] = False,
) -> None:
    """Run a whole sequence through a session; prints all outputs, (T, ...) each (JSON).

    Without --session a new session is started; a call that fails ends it again.
    """
    from rich.console import Console
    from rich.progress import Progress

    from rnnserve.client import ClientError

    xs = _load_sequence(input_file)
    values = _json_option(constants, "--constants")
    try:
        with _connect(ctx) as client:
            session, started = _open_session(
                client, model, session_id, start=start, version=version, constants=values, inputs=xs
            )
            first = next(iter(xs.values())) if isinstance(xs, dict) else xs
            total = len(first)
            try:
                with Progress(
                    console=Console(stderr=True),
                    transient=True,
                    disable=total < PROGRESS_MIN_STEPS,
                ) as progress:
                    task = progress.add_task(f"{model}: {total} steps", total=total)
                    outputs = session.run(
                        xs, on_step=lambda done, _: progress.update(task, completed=done)
                    )
            except ClientError as exc:
                raise _fail(exc, _ended_note(client, session, started)) from exc
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


@client_app.command("reset")
def client_reset(
    ctx: typer.Context,
    model: ModelArgument,
    session_id: SessionArgument,
    constants: Annotated[
        str | None, typer.Option(help="JSON constants by name (default: keep the session's)")
    ] = None,
) -> None:
    """Restart a session: seq 0, initial states (and new constants if given) (JSON)."""
    from rnnserve.client import ClientError

    values = _json_option(constants, "--constants")
    try:
        with _connect(ctx) as client:
            session = client.attach(model, session_id)
            info = session.reset(constants=values)
    except ClientError as exc:
        raise _fail(exc) from exc
    _print_json({"session_id": info.session_id, "version": info.version, "seq": info.seq})


@client_app.command("info")
def client_info(ctx: typer.Context, model: ModelArgument, session_id: SessionArgument) -> None:
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
def client_end(ctx: typer.Context, model: ModelArgument, session_id: SessionArgument) -> None:
    """End (delete) a session; `existed` is false if there was none (JSON)."""
    from rnnserve.client import ClientError

    try:
        with _connect(ctx) as client:
            existed = client.end_session(model, session_id)
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
        typer.Option(
            help="a file of the characters in token order (default: the model's signature "
            "metadata `vocabulary`)"
        ),
    ] = None,
) -> None:
    """Greedy text generation with a character model (the demo char-LSTM).

    The prompt runs as one sequence; then each most likely next character is fed back
    one step at a time, and printed as it comes. Characters map to token ids through
    the vocabulary the model's signature carries (config.yaml's `metadata:`, which
    `demo-model` writes), or --vocabulary.
    """
    import sys

    import numpy as np

    from rnnserve.client import ClientError

    chars: str | None = None
    if vocabulary is not None:
        try:
            chars = vocabulary.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise _usage(f"--vocabulary {vocabulary}: cannot read it ({exc})") from None
    printed = False
    try:
        with _connect(ctx) as client:
            signature = client.signature(model)
            if chars is None:
                chars = signature.metadata.get("vocabulary")
            if not chars:
                raise _usage(
                    f"model {model!r} has no `vocabulary` in its signature's metadata "
                    "(config.yaml `metadata:`); pass --vocabulary FILE"
                )
            index = {ch: i for i, ch in enumerate(chars)}
            if not prompt or set(prompt) - set(index):
                raise _usage(f"the prompt needs characters of the vocabulary {chars!r}")
            with client.session(model, version=signature.version) as session:
                logits = np.asarray(session.run(np.array([index[c] for c in prompt])))[-1]
                typer.echo(prompt, nl=False)
                printed = True
                for i in range(length):
                    token = int(np.argmax(logits))
                    typer.echo(chars[token], nl=False)
                    sys.stdout.flush()
                    if i < length - 1:
                        logits = np.asarray(session.step(token))
            typer.echo("")
    except ClientError as exc:
        if printed:
            typer.echo("")
        raise _fail(exc) from exc


def main() -> None:
    app()


if __name__ == "__main__":
    main()
