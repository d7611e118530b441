"""README.md: every ```python block runs for real, in order, as a reader would run them.

The blocks share one namespace (a later block may use what an earlier one built), the way a
reader pastes them into one session. A block with ``>>>`` prompts is a doctest: its output is
checked, with ELLIPSIS (``...`` stands for output the README elides) and NORMALIZE_WHITESPACE
(numpy wraps long reprs at its own line width, and a README line may be wrapped by hand). A
plain block only has to run without an error.

What the README assumes is set up around it: ``orders.csv`` (the test suite's generated
orders, :func:`tests.conftest.write_orders_csv`) and a relative ``registry`` in the working
directory, ``~/.hybridml`` under a temporary ``$HOME``, and a cloud serving that registry with
``hybridml-cloud serve --insecure --port 8000``. The test's server runs on a free port instead
of 8000 (a fixed port may be taken), so the README's URL is replaced by the server's URL in
the code before it runs.
"""

from __future__ import annotations

import doctest
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridml.cloud.registry import Registry
from tests.conftest import CloudServer, start_cloud, write_orders_csv

README = Path(__file__).resolve().parents[1] / "README.md"
README_URL = "http://127.0.0.1:8000"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
_BLOCK_RE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number of the block's first code line, code)`` of every ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK_RE.finditer(text)]


@pytest.fixture
def reader_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with ``orders.csv``, a fresh ``$HOME`` and no HYBRIDML_* settings."""
    for key in [k for k in os.environ if k.startswith("HYBRIDML_")]:
        monkeypatch.delenv(key)
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))  # ~/.hybridml, the README's store, lands here
    monkeypatch.chdir(work)
    write_orders_csv(work / "orders.csv")
    return work


@pytest.fixture
def readme_cloud(reader_dir: Path) -> Iterator[CloudServer]:
    """``hybridml-cloud serve --insecure`` over ``./registry`` (empty until a block trains)."""
    Registry(reader_dir / "registry").close()
    server = start_cloud(reader_dir / "registry")
    yield server
    server.stop()


def test_python_blocks_are_found() -> None:
    blocks = python_blocks("a\n```python\nx = 1\n```\nb\n```\nnot python\n```\n"
                           "```python\n>>> 1\n1\n```\n")
    assert blocks == [(3, "x = 1\n"), (10, ">>> 1\n1\n")]
    assert python_blocks(README.read_text(encoding="utf-8")), "README.md has no python block"


def test_every_python_example_in_the_readme_runs(readme_cloud: CloudServer) -> None:
    namespace: dict[str, object] = {"__name__": "__readme__"}
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for line, code in python_blocks(README.read_text(encoding="utf-8")):
        code = code.replace(README_URL, readme_cloud.url)
        where = f"README.md, the python block at line {line}"
        if re.search(r"^\s*>>> ", code, re.MULTILINE):
            test = doctest.DocTestParser().get_doctest(code, namespace, where, str(README),
                                                       line - 1)
            test.globs = namespace  # a DocTest runs on a copy; later blocks need these names
            report: list[str] = []
            result = runner.run(test, out=report.append, clear_globs=False)
            assert result.failed == 0, f"{where} does not show what it prints:\n" + \
                "".join(report)
        else:
            exec(compile(code, where, "exec"), namespace)
