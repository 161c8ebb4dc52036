"""The README stays true to the code: its commands and its configuration table."""

from __future__ import annotations

import re
from pathlib import Path

from rnnserve.service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_fresh_machine_commands() -> None:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block is not None
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 2
    serve, test = lines
    assert "bootstrap.sh" in serve and "rnnserve serve" in serve and "demo-model" in serve
    assert "bootstrap.sh" in test and "scripts/test.sh" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci


def test_configuration_table_lists_every_setting() -> None:
    rows = dict(re.findall(r"^\| `RNNSERVE_([A-Z0-9_]+)` \| `--([a-z0-9-]+)` \|", README, re.M))
    fields = set(Settings.model_fields)
    assert {name.lower() for name in rows} == fields
    for env_name, flag in rows.items():
        assert flag == env_name.lower().replace("_", "-")
