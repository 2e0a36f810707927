"""Fixtures of the FSEP device-path tests (test_fsep_sync.py, test_fsep_burst_sync.py)."""

import pytest
import torch.distributed as dist


class _Done:
    """A collective's handle whose wait returns at once."""

    def wait(self):
        pass


@pytest.fixture
def no_op_collectives(monkeypatch):
    """``all_to_all_single`` as a no-op: tensors without data (meta, fake CUDA) have nothing to send."""
    monkeypatch.setattr(dist, "all_to_all_single", lambda *args, **kwargs: _Done())
