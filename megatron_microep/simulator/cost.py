"""Cost model: modeled time of one MoE layer and micro-batch, and of per-step weight traffic.

Per (micro-batch, layer), forward and backward:

* expert compute: each GPU runs one grouped GEMM over its copies; a copy with n tokens costs
  ``flops_per_token * n / (peak * efficiency(n))``, where ``efficiency`` comes from a table of
  tokens -> fraction of peak (small token counts use the GPU poorly). The layer waits for the
  busiest GPU. Backward costs ``backward_factor`` times the forward.
* all-to-all: four per layer (dispatch and combine, forward and backward), each as long as the
  busiest GPU's largest per-link volume: ``max(intra bytes / intra bw, inter bytes / inter bw)``
  over its send and receive sides, plus ``a2a_latency_s``.
* weight moves decided per micro-batch (LLEP spills, BalanceMoE moves, UltraEP pushes): the
  receiving GPU waits for them before computing (not overlapped, as those papers describe);
  temporary copies send their gradients back after the backward pass.
* MicroEP's burst copies (``Assignment.step_copies``): weights pushed from the home GPU in one
  all-to-all issued with the dispatch all-to-all, sharing each GPU's links with it, so only the
  time the pair takes beyond the dispatch alone is charged; a copy is pushed once per step (later
  micro-batches reuse it) and its gradient goes home once per step with the replicas' (below).
* FSEP (LAER, and MicroEP's ``--microep-expert-sharding fsep``): every copy in a GPU's layout is
  gathered by an all-to-all of shards (1/G of the expert from every GPU) before the forward, and
  again before the backward when ``fsep_backward_gather`` (LAER's FSDP-style freeing, MicroEP's
  ``regather`` policy; MicroEP's ``keep`` policy keeps the copies instead); every copy's gradient
  goes back as shards in the parameter dtype (summed per expert in fp32 on the shard's GPU).
  ``fsep_recompute`` (MicroEP's ``regather``) adds one expert forward to the backward. Each GPU's
  transfer time is its slowest link over its send and receive sides; prefetch hides each transfer
  behind that pass's compute, so only the excess is charged.
* the policy's per-micro-batch decision, when it sits on the critical path (measured CPU time).

Per step and layer, as the runtime does it (``planning/replica_traffic.py`` counts the bytes):
every persistent replica is refreshed once, straight from its home GPU (one all-to-all, issued at
the start of the step and waited for at the layer's first expert compute: hidden behind the layer's
first forward compute, the excess charged), and returns its gradient once, accumulated over the
step's micro-batches in fp32, along the same pairs reversed (issued after the layer's last expert
backward and waited for before the gradient reduction: hidden behind one backward compute, the
excess charged); each transfer takes as long as its busiest GPU's slowest link. Burst copies
return their gradients the same way; they are pushed, not refreshed. A re-plan that moves
an expert's home copy moves its parameters and optimizer state (charged in full). Bytes on a link are not slowed by other
traffic on it (no contention model); compute and all-to-all of one layer do not overlap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_microep.planning.placement import Placement
from megatron_microep.planning.policies import Assignment, Traffic
from megatron_microep.planning.replica_traffic import replica_step_traffic

DEFAULT_GEMM_TABLE = Path(__file__).resolve().parent.parent / "data" / "gemm_efficiency_h100.csv"


class CostModelError(ValueError):
    """A bad cost-model parameter or efficiency table (named in the message)."""


@dataclass(frozen=True)
class GemmTable:
    """Efficiency (fraction of peak) vs tokens per expert, interpolated linearly in log(tokens)."""

    tokens: np.ndarray  # float64 [K], increasing, > 0
    efficiency: np.ndarray  # float64 [K], in (0, 1]
    source: str

    @classmethod
    def load(cls, path: str | Path = DEFAULT_GEMM_TABLE) -> GemmTable:
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise CostModelError(f"cannot read GEMM table {path}: {err.strerror}") from None
        rows = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not rows or rows[0].replace(" ", "") != "tokens,efficiency":
            raise CostModelError(f"{path}: first non-comment line must be the header 'tokens,efficiency'")
        tokens, eff = [], []
        for i, row in enumerate(rows[1:], start=2):
            parts = row.split(",")
            try:
                n, e = float(parts[0]), float(parts[1])
                if len(parts) != 2:
                    raise ValueError
            except (ValueError, IndexError):
                raise CostModelError(f"{path}: data row {i - 1} {row!r} is not 'tokens,efficiency'") from None
            if n <= 0 or not 0 < e <= 1:
                raise CostModelError(f"{path}: data row {i - 1}: need tokens > 0 and 0 < efficiency <= 1, got {row!r}")
            tokens.append(n)
            eff.append(e)
        if not tokens:
            raise CostModelError(f"{path}: no data rows")
        tokens_arr = np.asarray(tokens)
        if (np.diff(tokens_arr) <= 0).any():
            raise CostModelError(f"{path}: tokens must be strictly increasing")
        return cls(tokens_arr, np.asarray(eff), str(path))

    def __call__(self, n: np.ndarray) -> np.ndarray:
        n = np.asarray(n, dtype=np.float64)
        safe = np.maximum(n, 1e-9)
        return np.interp(np.log(safe), np.log(self.tokens), self.efficiency)


@dataclass(frozen=True)
class CostModel:
    """Parameters of the model (defaults: DeepSeek-V3-shaped experts on H100 SXM5 nodes of 8)."""

    hidden_size: int = 7168
    ffn_hidden_size: int = 2048  # per expert
    gated: bool = True  # SwiGLU: fc1 is [h, 2f]
    activation_bytes: float = 2.0  # bytes per hidden element on the wire (bf16)
    param_bytes: float = 2.0  # bf16 weights
    grad_bytes: float = 4.0  # fp32 main grads
    optimizer_bytes_per_param: float = 12.0  # fp32 master + Adam moments, moved with a home copy
    peak_tflops: float = 989.4
    backward_factor: float = 2.0
    intra_node_gbps: float = 450.0  # GB/s per GPU per direction (NVLink 4)
    inter_node_gbps: float = 50.0  # GB/s per GPU per direction (400 Gb/s NIC)
    a2a_latency_s: float = 20e-6
    charge_decision_time: bool = True
    fsep_backward_gather: bool = True  # FSEP: gather the layout again before the backward
    fsep_recompute: bool = False  # FSEP: the backward recomputes the expert forward
    gemm_table: GemmTable = field(default_factory=GemmTable.load, repr=False)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise CostModelError(f"cost model: {f.name} must be >= 0, got {value}")
        for name in ("hidden_size", "ffn_hidden_size", "peak_tflops", "intra_node_gbps", "inter_node_gbps"):
            if getattr(self, name) <= 0:
                raise CostModelError(f"cost model: {name} must be > 0")

    # --- derived constants -------------------------------------------------------------------
    @property
    def params_per_expert(self) -> int:
        return (3 if self.gated else 2) * self.hidden_size * self.ffn_hidden_size

    @property
    def flops_per_token(self) -> float:
        """Forward FLOPs of one token through one expert."""
        return 2.0 * self.params_per_expert

    @property
    def token_bytes(self) -> float:
        return self.hidden_size * self.activation_bytes

    @property
    def expert_param_bytes(self) -> float:
        return self.params_per_expert * self.param_bytes

    @property
    def expert_grad_bytes(self) -> float:
        return self.params_per_expert * self.grad_bytes

    def token_compute_s(self) -> float:
        """Forward time of one token at full efficiency (the unit the cost-aware policies use)."""
        return self.flops_per_token / (self.peak_tflops * 1e12 * float(self.gemm_table.efficiency.max()))

    def policy_cost_params(self) -> dict[str, dict[str, float]]:
        """Parameters of cost-aware policies in their token units, derived from this model."""
        unit = self.token_compute_s() * (1.0 + self.backward_factor)
        per_token_intra = self.token_bytes / (self.intra_node_gbps * 1e9)
        per_token_inter = self.token_bytes / (self.inter_node_gbps * 1e9)
        # LAER's T weighs 4 all-to-alls against 3 GEMM passes itself; its costs are per pass.
        laer = {
            "intra_cost": per_token_intra / self.token_compute_s(),
            "inter_cost": per_token_inter / self.token_compute_s(),
        }
        move_bytes = self.expert_param_bytes + self.expert_grad_bytes
        balancemoe = {
            "move_cost_intra": move_bytes / (self.intra_node_gbps * 1e9) / unit,
            "move_cost_inter": move_bytes / (self.inter_node_gbps * 1e9) / unit,
        }
        return {"laer": laer, "balancemoe": balancemoe}

    # --- per micro-batch ---------------------------------------------------------------------
    def compute_s(self, slot_tokens: np.ndarray, placement: Placement) -> np.ndarray:
        """float64 [G]: forward expert time of each GPU."""
        n = np.asarray(slot_tokens, dtype=np.float64)
        eff = self.gemm_table(n)
        seconds = np.where(n > 0, n * self.flops_per_token / (self.peak_tflops * 1e12 * eff), 0.0)
        return np.bincount(placement.gpus, weights=seconds, minlength=placement.num_gpus)

    def a2a_s(self, flow: Traffic) -> float:
        """One all-to-all's time: the busiest GPU's slowest link, plus launch latency."""
        b = self.token_bytes
        seconds = self.link_s(flow.send_intra * b, flow.send_inter * b, flow.recv_intra * b, flow.recv_inter * b)
        return seconds + self.a2a_latency_s

    def transfer_s(self, moves: np.ndarray, bytes_each: float, num_gpus: int, node_size: int) -> float:
        """Time for point-to-point transfers ``moves`` int [K, 2] (src, dst) of ``bytes_each``:
        the busiest endpoint's slowest link."""
        if len(moves) == 0:
            return 0.0
        src, dst = moves[:, 0], moves[:, 1]
        intra = (src // node_size) == (dst // node_size)
        worst = 0.0
        for mask, gbps in ((intra, self.intra_node_gbps), (~intra, self.inter_node_gbps)):
            if mask.any():
                per_gpu = np.maximum(
                    np.bincount(src[mask], minlength=num_gpus), np.bincount(dst[mask], minlength=num_gpus)
                )
                worst = max(worst, float(per_gpu.max()) * bytes_each / (gbps * 1e9))
        return worst

    def link_s(self, send_intra, send_inter, recv_intra, recv_inter) -> float:
        """Seconds of one exchange of these bytes per GPU (float [G] each): the busiest GPU's slowest link."""
        intra = np.maximum(send_intra, recv_intra) / (self.intra_node_gbps * 1e9)
        inter = np.maximum(send_inter, recv_inter) / (self.inter_node_gbps * 1e9)
        return float(np.maximum(intra, inter).max(initial=0.0))

    def pushes_beside_dispatch_s(self, flow: Traffic, pushes: np.ndarray, num_gpus: int, node_size: int) -> float:
        """Exposed seconds of expert weights ``pushes`` int [K, 2] (src, dst) sent in one all-to-all
        issued together with the dispatch all-to-all ``flow``: both share every GPU's links, so the
        pair takes the busiest GPU's slowest link over tokens and weights together; what exceeds the
        dispatch alone is charged (no launch latency: the two run concurrently)."""
        if len(pushes) == 0:
            return 0.0
        src, dst = pushes[:, 0], pushes[:, 1]
        intra = src // node_size == dst // node_size
        weights = {}
        for side, gpu in (("send", src), ("recv", dst)):
            for link, mask in (("intra", intra), ("inter", ~intra)):
                weights[f"{side}_{link}"] = np.bincount(gpu[mask], minlength=num_gpus) * self.expert_param_bytes
        tokens = {name: getattr(flow, name) * self.token_bytes for name in weights}
        alone = self.link_s(**tokens)
        return self.link_s(**{name: tokens[name] + weights[name] for name in weights}) - alone

    def fsep_shard_traffic(self, placement: Placement, node_size: int) -> dict[str, np.ndarray]:
        """Bytes of one FSEP gather per GPU (float64 [G] each): ``send_intra``, ``send_inter``,
        ``recv_intra``, ``recv_inter``. GPU g receives shard r of each of its copies from every other
        GPU r; it sends its own shard of every copy held elsewhere. The gradient return is the same
        traffic reversed (send and receive swapped), in the same dtype."""
        return self.fsep_copies_traffic(placement.slots_per_gpu(), node_size)

    def fsep_copies_traffic(self, copies_per_gpu: np.ndarray, node_size: int) -> dict[str, np.ndarray]:
        """``fsep_shard_traffic`` of a gather of ``copies_per_gpu`` int [G] copies on each GPU."""
        num_gpus = len(copies_per_gpu)
        shard = self.expert_param_bytes / num_gpus
        copies = np.asarray(copies_per_gpu, dtype=np.float64)  # [G]
        node = np.arange(num_gpus) // node_size
        node_copies = np.bincount(node, weights=copies)[node]  # copies held in each GPU's node
        recv_intra = copies * (node_size - 1) * shard
        recv_inter = copies * (num_gpus - node_size) * shard
        send_intra = (node_copies - copies) * shard
        send_inter = (copies.sum() - node_copies) * shard
        return {"send_intra": send_intra, "send_inter": send_inter, "recv_intra": recv_intra, "recv_inter": recv_inter}

    def fsep_burst_traffic(self, copies: np.ndarray, num_gpus: int, node_size: int) -> dict[str, np.ndarray]:
        """Bytes per GPU of one on-demand gather of FSEP burst copies ``copies`` int [K, 2] (expert, gpu):
        ``fsep_copies_traffic`` of the copies each GPU takes (every copy is gathered from every GPU's
        shard, wherever its expert's other copies are)."""
        return self.fsep_copies_traffic(np.bincount(copies[:, 1], minlength=num_gpus), node_size)

    def fsep_burst_rank_bytes(self, copies: np.ndarray, num_gpus: int) -> dict[str, np.ndarray]:
        """``fsep_rank_bytes`` of the burst copies ``copies`` int [K, 2] of one micro-batch and layer:
        ``fsep_gathers`` gathers (the second under ``regather``, in the backward) and one gradient return."""
        return self.fsep_copies_rank_bytes(np.bincount(copies[:, 1], minlength=num_gpus))

    def fsep_copies_rank_bytes(self, copies_per_gpu: np.ndarray) -> dict[str, np.ndarray]:
        """``fsep_rank_bytes`` of a gather of ``copies_per_gpu`` int [G] copies on each GPU."""
        t = self.fsep_copies_traffic(copies_per_gpu, node_size=len(copies_per_gpu))
        send, recv = t["send_intra"], t["recv_intra"]
        return {"sent": self.fsep_gathers * send + recv, "received": self.fsep_gathers * recv + send}

    def fsep_gather_s(self, placement: Placement, node_size: int) -> float:
        """Seconds of one FSEP gather (or gradient return): the busiest GPU's slowest link."""
        return self.link_s(**self.fsep_shard_traffic(placement, node_size))

    @property
    def fsep_gathers(self) -> int:
        """Gathers per layer and micro-batch (the gradient return is one more transfer of that size)."""
        return 2 if self.fsep_backward_gather else 1

    def fsep_rank_bytes(self, placement: Placement) -> dict[str, np.ndarray]:
        """Bytes each GPU sends (``sent``) and receives (``received``) for one micro-batch of one FSEP
        layer, float64 [G] each: ``fsep_gathers`` gathers and one gradient return (the gather's
        traffic reversed, in the parameter dtype). What MicroEP's runtime hands to its all-to-alls."""
        return self.fsep_copies_rank_bytes(placement.slots_per_gpu())

    def fsep_bytes(self, placement: Placement) -> float:
        """Bytes moved by one micro-batch of FSEP on one layer (all GPUs): the gathers and the
        gradient return, each sending (G-1)/G of every copy."""
        return float(self.fsep_rank_bytes(placement)["sent"].sum())


# MicroEP's --microep-fsep-memory-policy as cost-model settings (``dataclasses.replace(model, **...)``).
FSEP_MEMORY_POLICY_CHARGES = {
    "keep": {"fsep_backward_gather": False, "fsep_recompute": False},
    "regather": {"fsep_backward_gather": True, "fsep_recompute": True},
}


@dataclass(frozen=True)
class RecordCost:
    """Modeled cost of one (micro-batch, layer) under one policy."""

    gpu_load: np.ndarray  # int64 [G]
    compute_fwd_s: float  # busiest GPU's forward expert time
    compute_s: float  # forward + backward
    a2a_s: float  # four all-to-alls
    weight_move_s: float  # per-micro-batch weight moves (+ gradient return of temporary copies)
    fsep_exposed_s: float
    decision_s: float
    weight_bytes: float
    remote_tokens: int
    inter_node_tokens: int

    @property
    def total_s(self) -> float:
        return self.compute_s + self.a2a_s + self.weight_move_s + self.fsep_exposed_s + self.decision_s


def record_cost(
    model: CostModel,
    assignment: Assignment,
    flow: Traffic,
    node_size: int,
    *,
    temporary_copies: bool,
    fully_sharded: bool,
    decision_s: float,
    step_pushes: np.ndarray | None = None,
) -> RecordCost:
    """``step_pushes`` int [K, 2] (home, gpu): burst copies this micro-batch pushes (none held before)."""
    placement = assignment.placement
    per_gpu = model.compute_s(assignment.slot_tokens, placement)
    fwd = float(per_gpu.max(initial=0.0))
    bwd = model.backward_factor * fwd
    moves = assignment.weight_moves
    move_s = model.transfer_s(moves, model.expert_param_bytes, placement.num_gpus, node_size)
    weight_bytes = len(moves) * model.expert_param_bytes
    if step_pushes is not None and len(step_pushes):
        move_s += model.pushes_beside_dispatch_s(flow, step_pushes, placement.num_gpus, node_size)
        weight_bytes += len(step_pushes) * model.expert_param_bytes
    if temporary_copies and len(moves):
        move_s += model.transfer_s(moves[:, ::-1], model.expert_grad_bytes, placement.num_gpus, node_size)
        weight_bytes += len(moves) * model.expert_grad_bytes
    fsep = 0.0
    if fully_sharded:
        burst = assignment.gathered_copies
        G = placement.num_gpus
        held = placement.slots_per_gpu() - np.bincount(burst[:, 1], minlength=G)  # the prefetched layout's
        transfer = model.link_s(**model.fsep_copies_traffic(held, node_size))
        backward = transfer * (model.fsep_gathers - 1) + transfer  # gather again (if so), then return
        if model.fsep_recompute:
            bwd += fwd
        if len(burst):
            # Burst copies: gathered after the count read, beside the dispatch all-to-all (the pair's
            # excess over the dispatch alone is exposed); under regather gathered again on demand in
            # the backward (exposed); their gradients return with the layout's.
            t = model.fsep_burst_traffic(burst, G, node_size)
            tokens = {name: getattr(flow, name) * model.token_bytes for name in t}
            alone = model.link_s(**tokens)
            fsep += model.link_s(**{name: tokens[name] + t[name] for name in t}) - alone
            burst_s = model.link_s(**t)
            fsep += burst_s * (model.fsep_gathers - 1)
            backward += burst_s
            weight_bytes += float(model.fsep_burst_rank_bytes(burst, G)["sent"].sum())
        fsep += max(0.0, transfer - fwd) + max(0.0, backward - bwd)
        weight_bytes += float(model.fsep_copies_rank_bytes(held)["sent"].sum())
    return RecordCost(
        gpu_load=assignment.gpu_load(),
        compute_fwd_s=fwd,
        compute_s=fwd + bwd,
        a2a_s=4.0 * model.a2a_s(flow),
        weight_move_s=move_s,
        fsep_exposed_s=fsep,
        decision_s=decision_s if model.charge_decision_time else 0.0,
        weight_bytes=weight_bytes,
        remote_tokens=flow.remote_tokens,
        inter_node_tokens=flow.inter_node_tokens,
    )


def replica_sync(
    model: CostModel,
    home: np.ndarray,
    holder: np.ndarray,
    num_gpus: int,
    node_size: int,
    first_fwd_s: float,
    last_bwd_s: float,
    refreshed: np.ndarray | None = None,
) -> tuple[float, float]:
    """(exposed seconds, bytes) of one step's replica refresh and gradient return for copies
    ``(home, holder)`` int [K] each, hidden behind ``first_fwd_s`` and ``last_bwd_s`` of compute.
    ``refreshed`` bool [K] (default all): the persistent replicas; the others (burst copies, dropped
    at the step's end) only return gradients."""
    traffic = replica_step_traffic(home, holder, model.params_per_expert, model.param_bytes, refreshed=refreshed)
    if len(traffic.home) == 0:
        return 0.0, 0.0
    pairs = np.stack([traffic.home, traffic.holder], axis=1)
    refresh = model.transfer_s(pairs[traffic.refreshed], traffic.refresh_bytes, num_gpus, node_size)
    grads = model.transfer_s(pairs[:, ::-1], traffic.gradient_bytes, num_gpus, node_size)
    exposed = max(0.0, refresh - first_fwd_s) + max(0.0, grads - last_bwd_s)
    return exposed, traffic.total


def home_moves(model: CostModel, before: Placement, after: Placement, node_size: int) -> tuple[float, float]:
    """(seconds, bytes) to move the home copies that a re-plan relocated, optimizer state included."""
    old = before.gpus[before.ptr[:-1]]
    new = after.gpus[after.ptr[:-1]]
    moved = old != new
    if not moved.any():
        return 0.0, 0.0
    bytes_each = model.params_per_expert * (model.param_bytes + model.optimizer_bytes_per_param)
    pairs = np.stack([old[moved], new[moved]], axis=1)
    return model.transfer_s(pairs, bytes_each, before.num_gpus, node_size), int(moved.sum()) * bytes_each


def cost_model_fields() -> list[str]:
    """Names a user may override (everything but the table, which has its own flag)."""
    return [f.name for f in dataclasses.fields(CostModel) if f.name != "gemm_table"]
