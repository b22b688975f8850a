"""Shared fixtures. Everything offline; tiny models; threads capped so parallel tests stay polite."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest_plugins = ["support.lock_holders"]  # other_process: a live process whose PID a lock file names

# Under pytest-xdist (`make test` runs the unit tests on every core) the cores are shared out between the
# workers: two workers of two threads each on two cores spin against each other and run several times slower.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # and in the processes tests start


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Presets are materialised into a per-session cache so tests never see a stale folder."""
    os.environ["CXRDIST_CACHE"] = str(tmp_path_factory.mktemp("cxrdist-cache"))
    from cxrdist.logging_utils import quiet_dependencies

    quiet_dependencies()
    yield


@pytest.fixture(scope="session")
def tiny_base_path():
    from cxrdist.models.loading import preset_folder

    return str(preset_folder("tiny"))


def pytest_collection_modifyitems(config, items):
    """Everything under tests/integration is marked `integration` (end-to-end runs through the CLI or a launcher)."""
    integration = Path(__file__).parent / "integration"
    for item in items:
        if integration in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread here and in child processes: on a shared 2-core machine two spinning OpenMP threads per
    process next to another busy process make a step 10x slower or worse."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate():
    """Tests that build several Trainers in one process: accelerate's process-wide state reset around each."""
    from support.fakes import reset_accelerate

    reset_accelerate()
    yield
    reset_accelerate()
