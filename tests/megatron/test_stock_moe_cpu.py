"""Stock megatron-core MoELayer (allgather and alltoall dispatchers) on CPU ranks joined by gloo.

This is the ground the plugin's parity tests stand on: if megatron's own layer does not run, agree
with itself across dispatchers, and conserve tokens here, nothing built on the CPU harness can be
trusted. Layouts covered: EP=2, EP=4, EP=2 x expert-TP=2, and TP=2 (sequence parallel) x EP=2.
Ranks are launched once per world size (imports cost ~6 s per process) and run every layout in
turn; each check below reads the measurements that launch returns. Seeds are fresh per run and
printed; tolerances are 1e-6 relative to the tensor's scale when that exceeds one.
"""

import os
import random

import pytest
import torch

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo

HIDDEN = 16
FFN_HIDDEN = 24
NUM_EXPERTS = 8
TOPK = 2
SEQ_LEN = 12
MICRO_BATCH = 2
DISPATCHERS = ("allgather", "alltoall")
RECOMPUTED = "alltoall+recompute"
PARITY_TOL = 1e-6


def _build_stock_moe_layer(dispatcher: str, layout, pg_collection, recompute: bool = False):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp, ep, etp = layout
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        ffn_hidden_size=FFN_HIDDEN,
        moe_ffn_hidden_size=FFN_HIDDEN,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=TOPK,
        moe_token_dispatcher_type=dispatcher,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        # MoELayer refuses to train with TP > 1 without sequence parallelism.
        sequence_parallel=tp > 1,
        add_bias_linear=False,
        # Initialise as on GPU, through megatron's RNG tracker: each EP rank draws its own experts.
        # (use_cpu_initialization=True gives every EP rank identical local experts, which would
        # hide tokens reaching the wrong rank.)
        use_cpu_initialization=False,
        moe_layer_recompute=recompute,
        # Outputs of order one, so the 1e-6 parity tolerance is a real constraint (default 0.02
        # gives outputs ~1e-2).
        init_method_std=0.3,
    )
    spec = get_moe_module_spec(use_te=False, num_experts=NUM_EXPERTS, moe_grouped_gemm=False)
    # 0.16 returns a ModuleSpec, 0.19 a partial of MoELayer.
    if isinstance(spec, ModuleSpec):
        return build_module(spec, config=config, pg_collection=pg_collection)
    return spec(config=config, pg_collection=pg_collection)


def _gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """The equally shaped ``tensor`` of every rank in ``group``, concatenated along dim 0."""
    parts = [torch.empty_like(tensor) for _ in range(group.size())]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def _sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    # Row order inside an expert's block is a dispatcher detail; compare as multisets, keyed by a
    # fixed projection (identical rows give bitwise identical keys).
    key = rows.double() @ torch.linspace(1.0, 2.0, rows.shape[1], dtype=torch.float64)
    return rows[torch.argsort(key, stable=True)]


def _scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    # Float32 sums in a different token order (each dispatcher orders an expert's tokens its own
    # way) differ by ~1e-7 relative: measure against the tensor's scale when that exceeds one.
    return ((a - b).abs().max() / max(1.0, a.abs().max().item())).item()


def _round_trip(layer, x: torch.Tensor, upstream: torch.Tensor, pg_collection):
    """Dispatch ``x`` with the layer's own routing, weight by the probs, combine; no experts.

    Every expert-TP peer receives each of its experts' tokens and combine sums the peers' partial
    outputs, so with identity experts the layer returns ``etp * x * (sum of the token's probs)``.
    """
    with torch.no_grad():
        probs, routing_map = layer.router(x)
    dispatcher = layer.token_dispatcher
    x_in = x.detach().clone().requires_grad_(True)
    tokens, token_probs = dispatcher.dispatch_preprocess(x_in, routing_map, probs)
    tokens, token_probs = dispatcher.token_dispatch(tokens, token_probs)
    dispatched, tokens_per_expert, permuted_probs = dispatcher.dispatch_postprocess(tokens, token_probs)
    weighted = dispatched * permuted_probs.unsqueeze(-1).to(dispatched.dtype)
    restored = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(weighted)))
    (restored * upstream).sum().backward()

    etp = pg_collection.expt_tp.size()
    gain = etp * probs.sum(dim=-1).view(x.shape[0], x.shape[1], 1)
    tokens_per_expert = torch.as_tensor(tokens_per_expert).tolist()

    # What each local expert must have received: the tokens routed to it by every rank whose
    # tokens this rank's experts serve (the TP x EP group), each with its routing prob.
    flat_x = x.detach().reshape(-1, HIDDEN)
    all_rows = _gather_rows(torch.cat([flat_x, probs.detach().to(flat_x.dtype)], dim=1), pg_collection.tp_ep)
    all_routing = _gather_rows(routing_map.to(torch.uint8), pg_collection.tp_ep).bool()
    received = torch.cat([dispatched.detach(), permuted_probs.detach().unsqueeze(-1)], dim=1)
    expert_ids = list(layer.local_expert_indices)
    row_mismatch, count_mismatch, start = 0.0, [], 0
    for local, global_id in enumerate(expert_ids):
        expected_rows = all_rows[all_routing[:, global_id]]
        expected = torch.cat([expected_rows[:, :HIDDEN], expected_rows[:, HIDDEN + global_id, None]], 1)
        got = received[start : start + tokens_per_expert[local]]
        start += tokens_per_expert[local]
        if got.shape != expected.shape:
            count_mismatch.append((global_id, got.shape[0], expected.shape[0]))
        elif got.numel():
            diff = (_sorted_rows(got) - _sorted_rows(expected)).abs().max().item()
            row_mismatch = max(row_mismatch, diff)
    return {
        "tokens_per_expert": tokens_per_expert,
        "dispatched_rows": dispatched.shape[0],
        "expected_rows_total": int(all_routing[:, expert_ids].sum()),
        "count_mismatch": count_mismatch,
        "row_mismatch": row_mismatch,
        "restore_err": _scaled_diff(gain * x, restored.detach()),
        "restore_grad_err": _scaled_diff(gain * upstream, x_in.grad),
        "routed_assignments": int(routing_map.sum()),
        "etp": etp,
    }


def _run_layout(rank: int, layout, seed: int):
    tp, ep, etp = layout
    pg_collection = init_megatron_parallel(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        seed=seed,
    )
    layers = {d: _build_stock_moe_layer(d, layout, pg_collection) for d in DISPATCHERS}
    # Activation recompute replays the forward under saved RNG states (the CPU shim's job).
    layers[RECOMPUTED] = _build_stock_moe_layer("alltoall", layout, pg_collection, recompute=True)
    weights = {n: p.detach().clone() for n, p in layers["allgather"].named_parameters()}
    # Identical weights under every variant, whatever each one's init consumed from the RNG.
    for name in ("alltoall", RECOMPUTED):
        layers[name].load_state_dict(layers["allgather"].state_dict(), strict=True)

    # Each rank its own tokens (with TP > 1 and sequence parallelism: its own sequence shard).
    gen = torch.Generator().manual_seed(seed + 7919 * (rank + 1))
    x = torch.randn(SEQ_LEN, MICRO_BATCH, HIDDEN, generator=gen)
    upstream = torch.randn(SEQ_LEN, MICRO_BATCH, HIDDEN, generator=gen)

    result = {
        "n_local": NUM_EXPERTS // ep,
        "expert_rank": (pg_collection.ep.rank(), pg_collection.expt_tp.rank()),
        "weights": weights,
    }
    for name, layer in layers.items():
        x_in = x.clone().requires_grad_(True)
        out, bias = layer(x_in)
        (out * upstream).sum().backward()
        result[name] = {
            "experts_class": type(layer.experts).__name__,
            "out": out.detach(),
            "bias": bias,
            "x_grad": x_in.grad,
            "grads": {
                n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                for n, p in layer.named_parameters()
            },
        }
        layer.zero_grad(set_to_none=True)
        if name in DISPATCHERS:
            result[name]["round_trip"] = _round_trip(layer, x, upstream, pg_collection)
    return result


def _run_gpt(rank: int, world_size: int, seed: int):
    """A 2-layer MoE GPTModel (local spec, RoPE, dropout, alltoall, EP=world) trained one step,
    once with megatron's default causal mask and once with the same mask passed explicitly."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    init_megatron_parallel(expert_model_parallel_size=world_size, seed=seed)
    config = TransformerConfig(
        num_layers=2,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        ffn_hidden_size=FFN_HIDDEN,
        moe_ffn_hidden_size=FFN_HIDDEN,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=TOPK,
        moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=world_size,
        add_bias_linear=False,
        hidden_dropout=0.2,
        attention_dropout=0.2,
    )
    vocab, seq = 32, SEQ_LEN
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False),
        vocab_size=vocab,
        max_sequence_length=seq,
        position_embedding_type="rope",
    )
    gen = torch.Generator().manual_seed(seed + rank)
    tokens = torch.randint(0, vocab, (MICRO_BATCH, seq), generator=gen)
    positions = torch.arange(seq).expand(MICRO_BATCH, seq)
    explicit_mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    runs = {}
    for name, mask in (("default_mask", None), ("explicit_mask", explicit_mask)):
        # Same dropout draws in both runs: reseed the CPU generator and megatron's tracker.
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        model.zero_grad(set_to_none=True)
        loss = model(tokens, positions, mask, labels=tokens).float().mean()
        loss.backward()
        runs[name] = {
            "loss": loss.item(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
        }
    runs["param_names"] = [n for n, _ in model.named_parameters()]
    return runs


def _stock_moe_rank(rank: int, world_size: int, seed: int, layouts):
    import megatron.core

    results = {layout: _run_layout(rank, layout, seed) for layout in layouts}
    gpt = _run_gpt(rank, world_size, seed)
    return {"megatron_path": megatron.core.__file__, "layouts": results, "gpt": gpt}


# (TP, EP, expert-TP) layouts per launch; one launch per world size, re-initialising megatron's
# parallel state between layouts inside the same processes.
LAYOUTS = {2: [(1, 2, 1)], 4: [(1, 4, 1), (1, 2, 2), (2, 2, 1)]}


@pytest.fixture(scope="module", params=sorted(LAYOUTS), ids=lambda w: f"world{w}")
def stock_run(request):
    world = request.param
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(
        f"stock MoE on CPU: world={world} (TP, EP, ETP) layouts={LAYOUTS[world]} seed={seed} "
        f"(rerun with MICROEP_TEST_SEED={seed})"
    )
    ranks = spawn_gloo(_stock_moe_rank, world, seed, LAYOUTS[world], timeout_s=300)
    return world, seed, ranks


def _each_layout(stock_run):
    """(layout, seed, per-rank results) for every layout of the launch."""
    world, seed, ranks = stock_run
    for layout in LAYOUTS[world]:
        yield layout, seed, [r["layouts"][layout] for r in ranks]


def test_local_spec_uses_sequential_mlp(stock_run):
    for _layout, _, ranks in _each_layout(stock_run):
        assert {r[d]["experts_class"] for r in ranks for d in DISPATCHERS} == {"SequentialMLP"}


def test_expert_weights_follow_the_expert_parallel_rng(stock_run):
    # megatron seeds experts per (EP rank, expert-TP rank) and everything else identically: two
    # ranks hold the same expert weights exactly when they are expert-data-parallel peers.
    for layout, seed, ranks in _each_layout(stock_run):
        for i, a in enumerate(ranks):
            for j, b in enumerate(ranks):
                peers = a["expert_rank"] == b["expert_rank"]
                for name, weight in a["weights"].items():
                    same = torch.equal(weight, b["weights"][name])
                    if name.startswith("experts."):
                        assert same == peers, (layout, i, j, name, seed)
                    else:
                        assert same, (layout, i, j, name, seed)


def test_output_finite_and_shaped(stock_run):
    for layout, seed, ranks in _each_layout(stock_run):
        for rank, r in enumerate(ranks):
            for d in DISPATCHERS:
                out = r[d]["out"]
                where = (layout, d, rank, seed)
                assert out.shape == (SEQ_LEN, MICRO_BATCH, HIDDEN), where
                assert torch.isfinite(out).all(), where
                assert out.abs().max() > 0, where
                assert r[d]["bias"] is None, where


def test_router_and_expert_weights_get_gradients(stock_run):
    for layout, seed, ranks in _each_layout(stock_run):
        for rank, r in enumerate(ranks):
            for d in DISPATCHERS:
                grads = r[d]["grads"]
                assert grads["router.weight"].abs().sum() > 0, (layout, d, rank, seed)
                tokens = r[d]["round_trip"]["tokens_per_expert"]
                for local in range(r["n_local"]):
                    for fc in ("linear_fc1", "linear_fc2"):
                        g = grads[f"experts.local_experts.{local}.{fc}.weight"]
                        where = (layout, d, rank, local, fc, tokens, seed)
                        assert torch.isfinite(g).all(), where
                        # An expert gets a gradient exactly when some token reached it.
                        assert (g.abs().sum() > 0) == (tokens[local] > 0), where
        served = [t for r in ranks for t in r["alltoall"]["round_trip"]["tokens_per_expert"]]
        assert sum(t > 0 for t in served) >= len(served) // 2, (layout, served, seed)


def test_allgather_and_alltoall_agree(stock_run):
    for layout, seed, ranks in _each_layout(stock_run):
        for rank, r in enumerate(ranks):
            a, b = r["allgather"], r["alltoall"]
            where = (layout, rank, seed)
            assert _scaled_diff(a["out"], b["out"]) <= PARITY_TOL, where
            assert _scaled_diff(a["x_grad"], b["x_grad"]) <= PARITY_TOL, where
            assert a["grads"].keys() == b["grads"].keys()
            for name in a["grads"]:
                assert _scaled_diff(a["grads"][name], b["grads"][name]) <= PARITY_TOL, (name, where)


def test_recompute_replays_the_same_forward_and_backward(stock_run):
    for layout, seed, ranks in _each_layout(stock_run):
        for rank, r in enumerate(ranks):
            a, b = r["alltoall"], r[RECOMPUTED]
            assert torch.equal(a["out"], b["out"]), (layout, rank, seed)
            assert torch.equal(a["x_grad"], b["x_grad"]), (layout, rank, seed)
            for name in a["grads"]:
                assert torch.equal(a["grads"][name], b["grads"][name]), (layout, rank, name, seed)


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_dispatch_combine_round_trip_conserves_tokens(stock_run, dispatcher):
    world, _, _ = stock_run
    for layout, seed, ranks in _each_layout(stock_run):
        total_dispatched = total_routed = 0
        for rank, r in enumerate(ranks):
            rt = r[dispatcher]["round_trip"]
            where = (layout, rank, seed)
            assert rt["count_mismatch"] == [], (rt["count_mismatch"], where)
            assert rt["dispatched_rows"] == sum(rt["tokens_per_expert"]) == rt["expected_rows_total"], where
            # Rows are copied, never computed, on the way to the experts: bitwise equal.
            assert rt["row_mismatch"] == 0.0, where
            assert rt["restore_err"] <= PARITY_TOL, (rt["restore_err"], where)
            assert rt["restore_grad_err"] <= PARITY_TOL, (rt["restore_grad_err"], where)
            total_dispatched += rt["dispatched_rows"]
            total_routed += rt["routed_assignments"]
        assert total_routed == world * SEQ_LEN * MICRO_BATCH * TOPK, (layout, seed)
        # Each routed (token, expert) pair reaches every expert-TP shard of that expert once.
        assert total_dispatched == layout[2] * total_routed, (layout, seed)


def test_gpt_model_trains_a_step_with_default_or_explicit_mask(stock_run):
    _, seed, ranks = stock_run
    for rank, r in enumerate(ranks):
        default, explicit = r["gpt"]["default_mask"], r["gpt"]["explicit_mask"]
        assert torch.isfinite(torch.tensor(default["loss"])), (rank, seed)
        assert default["loss"] == explicit["loss"], (rank, seed)
        # Every parameter (embedding, attention, router, each local expert, output) gets a gradient.
        assert sorted(default["grads"]) == sorted(r["gpt"]["param_names"]), (rank, seed)
        for name, grad in default["grads"].items():
            assert torch.isfinite(grad).all(), (rank, name, seed)
            assert torch.equal(grad, explicit["grads"][name]), (rank, name, seed)


def test_ranks_ran_the_installed_megatron(stock_run):
    import megatron.core

    _, _, ranks = stock_run
    assert {r["megatron_path"] for r in ranks} == {megatron.core.__file__}


def _enable_twice_after_refusing_cuda(rank, world_size):
    from megatron.core.tensor_parallel import random as mcore_random

    from megatron_microep.glue.cpu import enable_cpu_megatron

    is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        enable_cpu_megatron()
    except RuntimeError as error:
        refusal = str(error)
    else:
        refusal = None
    torch.cuda.is_available = is_available
    untouched = mcore_random.CudaRNGStatesTracker.__name__
    first, second = enable_cpu_megatron(), enable_cpu_megatron()
    return refusal, untouched, first, second, str(torch.cuda.current_device())


def test_enable_cpu_megatron_refuses_cuda_and_is_idempotent():
    [(refusal, untouched, first, second, device)] = spawn_gloo(_enable_twice_after_refusing_cuda, 1)
    assert refusal is not None and "CUDA is available" in refusal
    assert untouched == "CudaRNGStatesTracker"  # the refusal patched nothing
    assert first == second and len(first) >= 4
    assert device == "cpu"
