"""The simulator's charge for FSEP burst copies (``microep_fsep`` with ``burst_slots``) and its policy.

The runtime's bytes for the same copies are measured in tests/megatron/test_fsep_burst.py (a spy on
the shard group's all-to-alls against ``CostModel.fsep_burst_rank_bytes``); here: how ``record_cost``
charges them (prefetched layout, on-demand burst gather beside the dispatch, returns with the
layout's) and what the policy decides.
"""

import dataclasses

import numpy as np
import pytest

from megatron_microep.planning.placement import Placement
from megatron_microep.planning.policies import Layout, PolicyError, traffic
from megatron_microep.planning.policies.microep_fsep import MicroEpFsepParams, MicroEpFsepPolicy
from megatron_microep.simulator.cost import FSEP_MEMORY_POLICY_CHARGES, CostModel, record_cost

G, E, NODE = 8, 16, 4


def _hot_tokens(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.poisson(200, (G, E)).astype(np.int64)
    tokens[:, 0] += 3000  # expert 0 far above what its copies can carry at the mean
    return tokens


def _policy(burst_slots: int) -> MicroEpFsepPolicy:
    return MicroEpFsepPolicy(Layout(G, E, 1, NODE), MicroEpFsepParams(burst_slots=burst_slots))


def _charge(model, assignment):
    return record_cost(
        model, assignment, traffic(assignment, NODE), NODE, temporary_copies=False, fully_sharded=True, decision_s=0.0
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_adds_copies_for_the_micro_batch_only(seed):
    tokens = _hot_tokens(seed)
    placement = Placement.contiguous(E, G)
    plain = _policy(0).assign_in_step(tokens, placement, np.zeros((0, 2), dtype=np.int64))
    burst = _policy(2).assign_in_step(tokens, placement, np.zeros((0, 2), dtype=np.int64))
    assert len(plain.gathered_copies) == 0
    assert len(burst.gathered_copies) > 0 and len(burst.step_copies) == 0  # nothing held for later micro-batches
    assert burst.gpu_load().sum() == tokens.sum() and burst.gpu_load().max() < plain.gpu_load().max()
    assert np.bincount(burst.gathered_copies[:, 1], minlength=G).max() <= 2
    extra = burst.placement.replica_counts() - placement.replica_counts()
    assert extra.sum() == len(burst.gathered_copies)


def test_node_confinement_is_refused():
    with pytest.raises(PolicyError, match="node confinement"):
        MicroEpFsepParams(burst_node_confined=True).validate()


@pytest.mark.parametrize("policy", ["keep", "regather"])
def test_charge_splits_the_prefetched_layout_from_the_on_demand_burst_gather(policy):
    model = dataclasses.replace(CostModel(), **FSEP_MEMORY_POLICY_CHARGES[policy])
    tokens = _hot_tokens(3)
    placement = Placement.contiguous(E, G)
    burst = _policy(2).assign_in_step(tokens, placement, np.zeros((0, 2), dtype=np.int64))
    copies = burst.gathered_copies
    charged = _charge(model, burst)
    layout_bytes = model.fsep_rank_bytes(placement)["sent"].sum()
    burst_bytes = model.fsep_burst_rank_bytes(copies, G)["sent"].sum()
    assert charged.weight_bytes == pytest.approx(layout_bytes + burst_bytes)
    # The burst gather is issued beside the dispatch all-to-all: its excess over the dispatch alone
    # is exposed however long the compute is (nothing prefetches it); under regather its backward
    # gather is exposed in full.
    t = model.fsep_burst_traffic(copies, G, NODE)
    flow = traffic(burst, NODE)
    dispatch = {name: getattr(flow, name) * model.token_bytes for name in t}
    beside = model.link_s(**{n: dispatch[n] + t[n] for n in t}) - model.link_s(**dispatch)
    regathered = model.link_s(**t) if policy == "regather" else 0.0
    slow = dataclasses.replace(model, peak_tflops=model.peak_tflops / 1000)  # compute hides every prefetch
    assert _charge(slow, burst).fsep_exposed_s == pytest.approx(beside + regathered)
    assert beside > 0
    # Without burst copies the charge is the layout's alone, as before.
    plain = dataclasses.replace(burst, placement=placement, gathered_copies=np.zeros((0, 2), dtype=np.int64))
    plain = dataclasses.replace(plain, slot_tokens=_policy(0).assign(tokens, placement).slot_tokens)
    assert _charge(model, plain).weight_bytes == pytest.approx(layout_bytes)
    assert charged.weight_bytes > _charge(model, plain).weight_bytes
