"""Megatron-LM checkouts for the tests that run Megatron-LM's own code (entry script, Slurm).

They come from the unchanged source snapshots in ``../shared/megatron-lm`` next to the repository
(``MEGATRON_LM_SNAPSHOTS`` names another folder), extracted once per session into a temporary folder,
or, when ``MEGATRON_LM_PATH`` is set, from that one checkout only. Without snapshots the tests skip
with a message on a developer machine and fail in CI (``CI`` set): CI must run them.
"""

import os
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT_DIR = Path(os.environ.get("MEGATRON_LM_SNAPSHOTS") or REPO.parent / "shared" / "megatron-lm")
# Snapshot name -> the megatron-core version it holds (../shared/megatron-lm/README.md).
SNAPSHOTS = {"core_v0.16.1": "0.16.1", "core_r0.19.0": "0.19.1", "main": "0.20.0"}
ENV_CHECKOUT = os.environ.get("MEGATRON_LM_PATH")
CHECKOUTS = ["MEGATRON_LM_PATH"] if ENV_CHECKOUT else list(SNAPSHOTS)


def missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI runs the Megatron-LM checkout tests and needs it", pytrace=False)
    pytest.skip(reason)


def _extract(name: str, into: Path) -> Path:
    archive = SNAPSHOT_DIR / f"Megatron-LM-{name}.tar.gz"
    if not archive.is_file():
        missing(f"no Megatron-LM snapshot {archive} (set MEGATRON_LM_SNAPSHOTS or MEGATRON_LM_PATH)")
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    (root,) = [p for p in into.iterdir() if p.is_dir()]  # one top folder per archive
    if not (root / "pretrain_gpt.py").is_file():
        pytest.fail(f"{archive} holds no pretrain_gpt.py", pytrace=False)
    return root


@pytest.fixture(scope="session")
def megatron_lm(tmp_path_factory):
    """``megatron_lm(name) -> Path``: the checkout for a name of ``CHECKOUTS``."""
    extracted = {}

    def checkout(name: str) -> Path:
        if name == "MEGATRON_LM_PATH":
            return Path(ENV_CHECKOUT)
        if name not in extracted:
            extracted[name] = _extract(name, tmp_path_factory.mktemp(f"megatron-lm-{name}"))
        return extracted[name]

    return checkout


def megatron_lm_env(checkout: Path, **extra) -> dict:
    """Environment for a Megatron-LM run from ``checkout`` on CPU ranks.

    This interpreter's folder goes first on PATH: Megatron-LM compiles its dataset helpers with
    ``python3 -m pybind11`` (``megatron/core/datasets/Makefile``) on the first run of a checkout.
    """
    env = {
        **os.environ,
        "MEGATRON_LM_PATH": str(checkout),
        "CUDA_VISIBLE_DEVICES": "",
        "GLOO_SOCKET_IFNAME": "lo",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.update(extra)
    return env
