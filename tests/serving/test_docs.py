"""docs/serving.md's Python examples (the blocks marked ``<!-- tested -->``) run as written against
the gateway of ``examples/collab-local.yaml``."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from edgemoe.serving.config import load_gateway_config
from edgemoe.serving.launcher import start_in_thread

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "serving.md").read_text()
BLOCKS = re.findall(r"<!-- tested -->\n```python\n(.*?)```", DOC, flags=re.S)


@pytest.fixture(scope="module")
def local_gateway():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEMOE_API_KEY", "change-me")
        run = start_in_thread(load_gateway_config(ROOT / "examples" / "collab-local.yaml"))
        yield run
        run.stop()


def test_the_doc_has_tested_examples_and_its_files_exist():
    assert len(BLOCKS) == 3
    for path in set(re.findall(r"--config (\S+\.yaml)", DOC)):
        assert (ROOT / path).is_file(), f"docs/serving.md runs a config that does not exist: {path}"


@pytest.mark.parametrize("index", range(3))
def test_python_example_runs(local_gateway, index):
    code = BLOCKS[index].replace("http://127.0.0.1:8000", local_gateway.url)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("EDGEMOE_API_KEY", "change-me")
        exec(compile(code, f"docs/serving.md example {index}", "exec"), {})
    assert out.getvalue().strip()
