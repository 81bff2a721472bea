"""The package under test is the artifact users get."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flumeq
from flumeq import _core

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    os.environ.get("FLUMEQ_EXPECT_WHEEL") != "1", reason="only when testing the built wheel"
)
def test_the_suite_runs_against_the_installed_wheel() -> None:
    package = Path(flumeq.__file__).resolve()
    assert ROOT / "python" not in package.parents, f"flumeq came from the source tree: {package}"
    assert "site-packages" in package.parts
    assert Path(_core.__file__).resolve().parent == package.parent


def test_one_version_everywhere() -> None:
    cargo = (ROOT / "rust" / "Cargo.toml").read_text()
    match = re.search(r'^version = "([^"]+)"', cargo, re.MULTILINE)
    assert match, "rust/Cargo.toml has no package version"
    from importlib.metadata import version  # noqa: PLC0415 (only here: it is slow to import)

    assert flumeq.__version__ == _core.__version__ == match.group(1) == version("flumeq")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert not re.search(r"^version = ", pyproject, re.MULTILINE), "a second version source"


def test_a_stale_core_is_refused_with_the_interface_it_expected(tmp_path: Path) -> None:
    """The error a user sees with Python files newer than their compiled core."""
    script = (
        "import sys, types; fake = types.ModuleType('flumeq._core'); "
        "fake.__file__ = '/old/_core.so'; fake.__version__ = '0.0.9'; fake.CORE_INTERFACE = 1; "
        "sys.modules['flumeq._core'] = fake; import flumeq"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert f"expect core interface {flumeq._version.CORE_INTERFACE}" in result.stderr
    assert "built from flumeq 0.0.9" in result.stderr and "has interface 1" in result.stderr


BLOCK_EXTRAS = (
    "import sys\n"
    "for name in ('starlette', 'uvicorn', 'jinja2', 'prometheus_client'):\n"
    "    sys.modules[name] = None  # as if the extras were not installed\n"
)


def run_without_extras(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_EXTRAS + code],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_a_producer_and_a_worker_need_no_extras(redis_url: str) -> None:
    result = run_without_extras(
        "import flumeq\n"
        f"client = flumeq.Client({redis_url!r})\n"
        "client.enqueue_many([('noop', {}) for _ in range(100)])\n"
        f"report = flumeq.Engine({{'noop': lambda task: None}}, {redis_url!r}).run(processes=1, burst=True)\n"
        "assert report['processed'] == 100, report\n"
    )
    assert result.returncode == 0, result.stderr


def test_missing_extras_are_named_with_the_install_command() -> None:
    ui = run_without_extras("from flumeq.cli import main; main(['ui'])")
    assert ui.returncode == 1
    assert "flumeq ui needs the 'web' extra" in ui.stderr
    assert "pip install 'flumeq[web]'" in ui.stderr
    web = run_without_extras("import flumeq.web")
    assert "ImportError" in web.stderr and "pip install 'flumeq[web]'" in web.stderr
    metrics = run_without_extras("import flumeq; flumeq.Engine({}, metrics_port=9808)")
    assert "ConfigError: metrics_port needs the 'metrics' extra" in metrics.stderr
    assert "pip install 'flumeq[metrics]'" in metrics.stderr
