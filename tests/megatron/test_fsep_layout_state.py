"""``check_layout_state``: the validation of a checkpoint's FSEP layout state, in one process.

A valid state (built as ``FSEPPlacementController.state`` builds it) passes and comes back with
``Placement`` objects and int64 loads; every malformed or foreign variant raises
``FSEPLayoutStateError`` with a message naming the layer and the problem. (Saving, restoring and
re-planning across EP sizes run in tests/megatron/test_fsep_gpt.py.)
"""
import numpy as np
import pytest

pytest.importorskip("megatron.core")

from megatron_microep.glue.fsep import LAYOUT_STATE_FORMAT, FSEPLayoutStateError, check_layout_state  # noqa: E402
from megatron_microep.planning.placement import Placement  # noqa: E402

E, G, C = 8, 4, 3
WHERE = "FSEP layer 7"


def _valid():
    placement = [[0, 1], [0], [1, 2], [1], [2, 3], [2], [3, 0], [3]]  # 3 copies per rank
    return {
        "format": LAYOUT_STATE_FORMAT, "num_experts": E, "num_ranks": G, "slots_per_rank": C,
        "placement": placement, "history": [np.arange(2 * E, dtype=np.int64).reshape(2, E)] * 3,
        "current_rows": np.ones((2, E), dtype=np.int64), "step": 12,
        "pending": {"adopt_step": 13, "placement": placement},
    }


def test_valid_state_is_returned_checked():
    state = check_layout_state(_valid(), E, WHERE)
    assert isinstance(state["placement"], Placement) and state["placement"].to_lists() == _valid()["placement"]
    assert isinstance(state["pending"]["placement"], Placement)
    assert all(block.dtype == np.int64 and block.shape == (2, E) for block in state["history"])
    failed_plan = {**_valid(), "pending": {"adopt_step": 13, "placement": None}, "step": None, "history": []}
    assert check_layout_state(failed_plan, E, WHERE)["pending"]["placement"] is None


@pytest.mark.parametrize("change, fragment", [
    (lambda s: ["not", "a", "dict"], "malformed FSEP layout state"),
    (lambda s: {k: v for k, v in s.items() if k != "step"}, "malformed FSEP layout state"),
    (lambda s: {**s, "extra": 1}, "malformed FSEP layout state"),
    (lambda s: {**s, "format": LAYOUT_STATE_FORMAT + 1}, f"format {LAYOUT_STATE_FORMAT + 1}"),
    (lambda s: {**s, "num_experts": 16}, "is for 16 experts, this layer has 8"),
    (lambda s: {**s, "num_ranks": 0}, "num_ranks=0"),
    (lambda s: {**s, "slots_per_rank": "3"}, "slots_per_rank='3'"),
    (lambda s: {**s, "placement": [[]] + s["placement"][1:]}, "saved layout: not an FSEP layout"),
    (lambda s: {**s, "placement": [[0, 0]] + s["placement"][1:]}, "saved layout: not an FSEP layout"),
    (lambda s: {**s, "placement": [[g] for g in [0] * 4 + [1] * 4]}, "saved layout: not an FSEP layout"),
    (lambda s: {**s, "placement": [[5]] + s["placement"][1:]}, "saved layout: not an FSEP layout"),
    (lambda s: {**s, "history": "steps"}, "saved routing history must be a list"),
    (lambda s: {**s, "history": [np.zeros((2, E - 1), dtype=np.int64)]}, "saved routing history, step 0"),
    (lambda s: {**s, "history": [np.zeros((2, E))]}, "saved routing history, step 0"),
    (lambda s: {**s, "current_rows": -np.ones((1, E), dtype=np.int64)}, "saved current-step loads"),
    (lambda s: {**s, "step": 1.5}, "saved step must be an integer"),
    (lambda s: {**s, "pending": {"adopt_step": 13}}, "malformed pending plan"),
    (lambda s: {**s, "pending": {"adopt_step": 13, "placement": [[0]] * E}}, "saved pending plan: not an FSEP layout"),
])
def test_malformed_states_are_rejected(change, fragment):
    with pytest.raises(FSEPLayoutStateError) as err:
        check_layout_state(change(_valid()), E, WHERE)
    assert fragment in str(err.value) and WHERE in str(err.value), str(err.value)
