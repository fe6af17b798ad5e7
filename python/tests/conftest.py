"""Fixtures of the zo2 Python tests: the build's zo2-tune and C reference, tiny models."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(os.environ.get("ZO2_SOURCE_DIR", Path(__file__).resolve().parents[2]))


def _tool(env: str, default: str) -> Path:
    p = Path(os.environ.get(env, SOURCE / "build" / default))
    if not p.exists():
        pytest.skip(f"{p} is not built (set {env})")
    return p


@pytest.fixture(scope="session")
def tune() -> Path:
    return _tool("ZO2_TUNE", "tools/zo2-tune")


@pytest.fixture(scope="session")
def capi_ref() -> Path:
    return _tool("ZO2_PY_CAPI_REF", "python/zo2_py_capi_ref")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tune) -> Path:
    """An opt-tiny checkpoint (random weights, seed 1)."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    subprocess.run([str(tune), "-q", "init", "--preset", "opt-tiny", "--seed", "1", "--out", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def synth(tmp_path_factory, tune, tiny) -> Path:
    """A learnable token dataset for tiny (64 rows of 16 tokens)."""
    out = tmp_path_factory.mktemp("data") / "synth.safetensors"
    subprocess.run([str(tune), "-q", "synth-data", "--out", str(out), "--model", str(tiny), "--rows", "64",
                    "--seq", "16"], check=True)
    return out


@pytest.fixture
def fresh_dir(tmp_path) -> Path:
    d = tmp_path / "out"
    yield d
    shutil.rmtree(d, ignore_errors=True)
