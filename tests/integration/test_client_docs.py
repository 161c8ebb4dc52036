"""Every `python` block of docs/client.md, run in order against a real server.

The blocks share one namespace (as a reader going down the page would) and talk to
`localhost:8001`, which is replaced by the address of a server on port 0 that serves
the demo model `char_lstm` (untrained: the examples check shapes and seqs, not text).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._grpc_util import running_server
from tests.models import write_char_lstm
from tests.servers import ServerThread

PAGE = Path(__file__).resolve().parents[2] / "docs" / "client.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def char_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = write_char_lstm(tmp_path_factory.mktemp("docs-models"))
    with running_server(repo, warmup=False) as server:
        yield server


def test_the_page_has_examples() -> None:
    assert len(BLOCKS) >= 8


def test_every_python_block_runs(char_server: ServerThread) -> None:
    namespace: dict[str, object] = {"__name__": "docs_client"}
    for number, block in enumerate(BLOCKS, start=1):
        code = block.replace("localhost:8001", char_server.address)
        try:
            exec(compile(code, f"docs/client.md block {number}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"docs/client.md block {number} failed:\n{block}") from exc
