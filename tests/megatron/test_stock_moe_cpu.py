"""Stock megatron-core MoELayer (allgather and alltoall dispatchers) on CPU ranks joined by gloo.

This is the ground the plugin's parity tests stand on: if megatron's own layer does not run, agree
with itself across dispatchers, and conserve tokens here, nothing built on the CPU harness can be
trusted. Ranks are launched once per EP size (imports cost ~6 s per process); every check below
reads the measurements that one launch returns. Seeds are fresh per run and printed.
"""
import os
import random

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402

from megatron_microep.glue.distributed import init_megatron_parallel, spawn_gloo  # noqa: E402

HIDDEN = 16
FFN_HIDDEN = 24
NUM_EXPERTS = 8
TOPK = 2
SEQ_LEN = 12
MICRO_BATCH = 2
DISPATCHERS = ("allgather", "alltoall")
PARITY_TOL = 1e-6


def _build_stock_moe_layer(dispatcher: str, ep_size: int, pg_collection):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        ffn_hidden_size=FFN_HIDDEN,
        moe_ffn_hidden_size=FFN_HIDDEN,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=TOPK,
        moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=ep_size,
        add_bias_linear=False,
        use_cpu_initialization=True,
        # Outputs of order one, so the 1e-6 parity tolerance is a real constraint (default 0.02
        # gives outputs ~1e-2).
        init_method_std=0.3,
    )
    spec = get_moe_module_spec(use_te=False, num_experts=NUM_EXPERTS, moe_grouped_gemm=False)
    # 0.16 returns a ModuleSpec, 0.19 a partial of MoELayer.
    if isinstance(spec, ModuleSpec):
        return build_module(spec, config=config, pg_collection=pg_collection)
    return spec(config=config, pg_collection=pg_collection)


def _gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' equally shaped ``tensor`` concatenated along dim 0 in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    # Row order inside an expert's block is a dispatcher detail; compare as multisets, keyed by a
    # fixed projection (identical rows give bitwise identical keys).
    key = rows.double() @ torch.linspace(1.0, 2.0, rows.shape[1], dtype=torch.float64)
    return rows[torch.argsort(key, stable=True)]


def _round_trip(layer, x: torch.Tensor, upstream: torch.Tensor, global_expert_ids):
    """Dispatch ``x`` with the layer's own routing, weight by the probs, combine; no experts."""
    with torch.no_grad():
        probs, routing_map = layer.router(x)
    dispatcher = layer.token_dispatcher
    x_in = x.detach().clone().requires_grad_(True)
    tokens, token_probs = dispatcher.dispatch_preprocess(x_in, routing_map, probs)
    tokens, token_probs = dispatcher.token_dispatch(tokens, token_probs)
    dispatched, tokens_per_expert, permuted_probs = dispatcher.dispatch_postprocess(
        tokens, token_probs
    )
    weighted = dispatched * permuted_probs.unsqueeze(-1).to(dispatched.dtype)
    restored = dispatcher.combine_postprocess(
        dispatcher.token_combine(dispatcher.combine_preprocess(weighted))
    )
    (restored * upstream).sum().backward()

    prob_mass = probs.sum(dim=-1).view(x.shape[0], x.shape[1], 1)
    tokens_per_expert = torch.as_tensor(tokens_per_expert).tolist()

    # What each local expert must have received: every rank's tokens routed to it, with their probs.
    flat_x = x.detach().reshape(-1, x.shape[-1])
    all_rows = _gather_rows(torch.cat([flat_x, probs.detach().to(flat_x.dtype)], dim=1))
    all_routing = _gather_rows(routing_map.to(torch.uint8)).bool()
    received = torch.cat([dispatched.detach(), permuted_probs.detach().unsqueeze(-1)], dim=1)
    row_mismatch, count_mismatch, start = 0.0, [], 0
    for local, global_id in enumerate(global_expert_ids):
        expected_rows = all_rows[all_routing[:, global_id]]
        expected = torch.cat([expected_rows[:, :HIDDEN], expected_rows[:, HIDDEN + global_id, None]], 1)
        got = received[start : start + tokens_per_expert[local]]
        start += tokens_per_expert[local]
        if got.shape != expected.shape:
            count_mismatch.append((global_id, got.shape[0], expected.shape[0]))
            continue
        if got.numel():
            row_mismatch = max(row_mismatch, (_sorted_rows(got) - _sorted_rows(expected)).abs().max().item())
    return {
        "tokens_per_expert": tokens_per_expert,
        "dispatched_rows": dispatched.shape[0],
        "expected_rows_total": int(all_routing[:, global_expert_ids].sum()),
        "count_mismatch": count_mismatch,
        "row_mismatch": row_mismatch,
        "restore_err": (restored.detach() - x * prob_mass).abs().max().item(),
        "restore_grad_err": (x_in.grad - upstream * prob_mass).abs().max().item(),
        "routed_assignments": int(routing_map.sum()),
    }


def _stock_moe_rank(rank: int, world_size: int, seed: int):
    import megatron.core

    pg_collection = init_megatron_parallel(expert_model_parallel_size=world_size, seed=seed)
    layers = {d: _build_stock_moe_layer(d, world_size, pg_collection) for d in DISPATCHERS}
    # Identical weights under both dispatchers, whatever each one's init consumed from the RNG.
    layers["alltoall"].load_state_dict(layers["allgather"].state_dict(), strict=True)
    n_local = NUM_EXPERTS // world_size
    global_expert_ids = list(range(rank * n_local, (rank + 1) * n_local))

    gen = torch.Generator().manual_seed(seed + 7919 * (rank + 1))
    x = torch.randn(SEQ_LEN, MICRO_BATCH, HIDDEN, generator=gen)
    upstream = torch.randn(SEQ_LEN, MICRO_BATCH, HIDDEN, generator=gen)

    result = {"megatron_path": megatron.core.__file__, "n_local": n_local}
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
        result[name]["round_trip"] = _round_trip(layer, x, upstream, global_expert_ids)
    return result


@pytest.fixture(scope="module", params=[2, 4], ids=lambda ep: f"ep{ep}")
def stock_run(request):
    ep = request.param
    seed = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"stock MoE on CPU: EP={ep} seed={seed} (rerun with MICROEP_TEST_SEED={seed})")
    return ep, seed, spawn_gloo(_stock_moe_rank, ep, seed, timeout_s=240)


def test_local_spec_uses_sequential_mlp(stock_run):
    _, _, ranks = stock_run
    assert {r[d]["experts_class"] for r in ranks for d in DISPATCHERS} == {"SequentialMLP"}


def test_output_finite_and_shaped(stock_run):
    ep, seed, ranks = stock_run
    for rank, r in enumerate(ranks):
        for d in DISPATCHERS:
            out = r[d]["out"]
            assert out.shape == (SEQ_LEN, MICRO_BATCH, HIDDEN), (d, rank, seed)
            assert torch.isfinite(out).all(), (d, rank, seed)
            assert out.abs().max() > 0, (d, rank, seed)
            assert r[d]["bias"] is None, (d, rank, seed)


def test_router_and_expert_weights_get_gradients(stock_run):
    ep, seed, ranks = stock_run
    for rank, r in enumerate(ranks):
        for d in DISPATCHERS:
            grads = r[d]["grads"]
            assert grads["router.weight"].abs().sum() > 0, (d, rank, seed)
            tokens = r[d]["round_trip"]["tokens_per_expert"]
            for local in range(r["n_local"]):
                for fc in ("linear_fc1", "linear_fc2"):
                    g = grads[f"experts.local_experts.{local}.{fc}.weight"]
                    assert torch.isfinite(g).all(), (d, rank, local, fc, seed)
                    # An expert gets a gradient exactly when some token reached it.
                    assert (g.abs().sum() > 0) == (tokens[local] > 0), (d, rank, local, fc, tokens, seed)
    all_tokens = [t for r in ranks for t in r["alltoall"]["round_trip"]["tokens_per_expert"]]
    assert sum(t > 0 for t in all_tokens) >= NUM_EXPERTS // 2, (all_tokens, seed)


def test_allgather_and_alltoall_agree(stock_run):
    ep, seed, ranks = stock_run
    for rank, r in enumerate(ranks):
        a, b = r["allgather"], r["alltoall"]
        assert (a["out"] - b["out"]).abs().max() <= PARITY_TOL, (rank, seed)
        assert (a["x_grad"] - b["x_grad"]).abs().max() <= PARITY_TOL, (rank, seed)
        assert a["grads"].keys() == b["grads"].keys()
        for name in a["grads"]:
            assert (a["grads"][name] - b["grads"][name]).abs().max() <= PARITY_TOL, (rank, name, seed)


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_dispatch_combine_round_trip_conserves_tokens(stock_run, dispatcher):
    ep, seed, ranks = stock_run
    total_dispatched = total_routed = 0
    for rank, r in enumerate(ranks):
        rt = r[dispatcher]["round_trip"]
        assert rt["count_mismatch"] == [], (rank, rt["count_mismatch"], seed)
        assert rt["dispatched_rows"] == sum(rt["tokens_per_expert"]) == rt["expected_rows_total"]
        # Rows are copied, never computed, on the way to the experts: bitwise equal.
        assert rt["row_mismatch"] == 0.0, (rank, seed)
        assert rt["restore_err"] <= 1e-6, (rank, rt["restore_err"], seed)
        assert rt["restore_grad_err"] <= 1e-6, (rank, rt["restore_grad_err"], seed)
        total_dispatched += rt["dispatched_rows"]
        total_routed += rt["routed_assignments"]
    assert total_routed == ep * SEQ_LEN * MICRO_BATCH * TOPK
    assert total_dispatched == total_routed, seed


def test_ranks_ran_the_installed_megatron(stock_run):
    import megatron.core

    _, _, ranks = stock_run
    assert {r["megatron_path"] for r in ranks} == {megatron.core.__file__}
