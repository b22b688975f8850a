"""cxrdist.train.checkpoint.check_shared_folder: every rank must see the run folder (checkpoints are written by
rank 0 and read by all on resume), so a folder that is local to one node is refused on every rank, naming the
ranks that cannot see it."""
from __future__ import annotations

import pytest
import torch

from cxrdist.errors import InputError


class _FakeRanks:
    """Two ranks seen from one of them: rank 1's view of a folder can differ from rank 0's (another node)."""

    num_processes, device = 2, "cpu"

    def __init__(self, rank: int, other_sees: bool):
        self.process_index, self.is_main_process, self.other_sees = rank, rank == 0, other_sees

    def wait_for_everyone(self) -> None:
        pass

    def gather(self, tensor):
        other = torch.tensor([1.0 if self.other_sees else 0.0])
        return torch.cat([tensor, other] if self.is_main_process else [other, tensor])


def test_a_run_folder_that_another_rank_cannot_see_is_refused(tmp_path):
    from cxrdist.train.checkpoint import SHARED_PROBE, check_shared_folder

    check_shared_folder(_FakeRanks(0, other_sees=True), tmp_path / "run")
    assert not (tmp_path / "run" / SHARED_PROBE).exists()  # rank 0 cleans up after the check
    with pytest.raises(InputError, match=r"not shared by all ranks: rank\(s\) \[1\].*filesystem that every node mounts"):
        check_shared_folder(_FakeRanks(1, other_sees=True), tmp_path / "node1", wait_s=0.2)  # rank 1 sees nothing
    with pytest.raises(InputError, match=r"rank\(s\) \[1\]"):
        check_shared_folder(_FakeRanks(0, other_sees=False), tmp_path / "run", wait_s=0.2)  # rank 0 learns it too
