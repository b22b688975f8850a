"""cxrdist.train.deepspeed_ops without launching processes: a DeepSpeed rank on the CPU accelerator starts its
communication backend without building (or loading) the shared-memory all-reduce op."""
from __future__ import annotations

import importlib

import pytest

from cxrdist.train import deepspeed_ops

deepspeed = pytest.importorskip("deepspeed")


@pytest.fixture
def cpu_deepspeed(monkeypatch):
    """DeepSpeed's CPU accelerator in a DeepSpeed launch, whatever this machine has; op loads are recorded.

    The accelerator and the compatible-ops dict are per-process state of DeepSpeed's: both are put back."""
    import deepspeed.ops
    from deepspeed.accelerator import real_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(real_accelerator, "ds_accelerator", CPU_Accelerator())
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, ShareMemCommBuilder.NAME, True)
    built = []

    def load(self, verbose=False):
        built.append(self.NAME)
        return "loaded op"

    monkeypatch.setattr(ShareMemCommBuilder, "load", load)
    return built


def _build_shm_op():
    # `deepspeed.comm.torch` as an attribute is the torch module (deepspeed.comm imports torch by that name)
    return importlib.import_module("deepspeed.comm.torch").build_shm_op()


def test_deepspeed_rank_on_cpu_neither_builds_nor_loads_the_shm_op(cpu_deepspeed):
    assert deepspeed_ops.skip_shm_comm_op() is True
    assert _build_shm_op() is None  # what TorchBackend.__init__ calls: no JIT build, no build lock, no .so
    assert cpu_deepspeed == []


def test_without_the_skip_deepspeed_builds_the_op_in_the_rank(cpu_deepspeed):
    # The control: the switch used by skip_shm_comm_op is what decides, not this test's setup.
    assert _build_shm_op() == "loaded op"
    assert cpu_deepspeed == ["deepspeed_shm_comm"]


def test_outside_a_deepspeed_launch_nothing_is_touched(cpu_deepspeed, monkeypatch):
    import deepspeed.ops

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert deepspeed_ops.skip_shm_comm_op() is False
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is True


def test_an_accelerator_without_the_op_is_left_alone(cpu_deepspeed, monkeypatch):
    # CUDA's accelerator has no ShareMemCommBuilder: DeepSpeed builds nothing there and nothing is changed.
    from deepspeed.accelerator import real_accelerator

    class NoShmAccelerator:
        def create_op_builder(self, name):
            return None

    monkeypatch.setattr(real_accelerator, "ds_accelerator", NoShmAccelerator())
    assert deepspeed_ops.skip_shm_comm_op() is False
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is True
