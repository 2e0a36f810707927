"""Balancing policies behind one interface (``base.Policy``), selectable by name.

``POLICIES`` maps each name to its class; ``make_policy(name, layout, **params)`` validates the
parameters against the policy's documented ``Params``. The trace simulator and the runtime use the
same objects.
"""

from __future__ import annotations

from typing import Any

from megatron_microep.planning.policies.balancemoe import BalanceMoePolicy
from megatron_microep.planning.policies.base import (
    Assignment,
    History,
    HistoryWindow,
    Layout,
    Policy,
    PolicyError,
    Traffic,
    build_params,
    check_placement,
    parameter_docs,
    traffic,
)
from megatron_microep.planning.policies.eplb import EplbPolicy
from megatron_microep.planning.policies.ideal import IdealPolicy
from megatron_microep.planning.policies.laer import LaerPolicy
from megatron_microep.planning.policies.llep import LlepPolicy
from megatron_microep.planning.policies.microep import MicroEpPolicy
from megatron_microep.planning.policies.static import StaticPolicy
from megatron_microep.planning.policies.ultraep import UltraEpPolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        StaticPolicy,
        EplbPolicy,
        LaerPolicy,
        LlepPolicy,
        BalanceMoePolicy,
        UltraEpPolicy,
        MicroEpPolicy,
        IdealPolicy,
    )
}


def make_policy(name: str, layout: Layout, **params: Any) -> Policy:
    """The policy ``name`` for ``layout`` with ``params`` (validated; unknown names raise PolicyError)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise PolicyError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None
    return cls(layout, build_params(cls, params))


__all__ = [
    "POLICIES",
    "Assignment",
    "History",
    "HistoryWindow",
    "Layout",
    "Policy",
    "PolicyError",
    "Traffic",
    "check_placement",
    "make_policy",
    "parameter_docs",
    "traffic",
]
