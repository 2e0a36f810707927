"""Seeded routing workloads: per-source token counts over a sequence of micro-batches.

Every generator returns ``tokens`` int64 [M, G, E]: ``tokens[m, s, e]`` is the number of tokens that
source GPU ``s`` routes to logical expert ``e`` in micro-batch ``m``. Each row ``tokens[m, s]`` sums
to ``tokens_per_gpu * topk`` and no entry exceeds ``tokens_per_gpu`` (a top-k router picks an expert at
most once per token); these two conditions are exactly what makes a count vector realizable by top-k
routing of ``tokens_per_gpu`` tokens, so the generators produce counts, not per-token choices.

Skew comes from per-micro-batch expert probabilities; sources differ by a small lognormal perturbation
(``source_sigma``), as data-parallel ranks see different data. ``expert_loads(tokens)`` gives the
[M, E] per-expert totals the placement planner takes as history.

Workloads with ``dsv3`` in the name are *derived* from recorded DeepSeek-V3 expert loads (SGLang's
EP statistics, see shared/data/routing/README.md beside the checkout): the recorded per-layer load vectors set the
probabilities, and everything sampled from them is synthetic.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

DSV3_FILE_NAME = "sglang_dsv3_logical_count.npz"
# The recording is third-party data: it ships beside a checkout in ../shared, not in the package.
DSV3_DEFAULT_DIRS = (Path(__file__).resolve().parents[2].parent / "shared" / "data" / "routing",)


def expert_loads(tokens: np.ndarray) -> np.ndarray:
    """int64 [M, G, E] per-source counts -> int64 [M, E] per-expert totals (the planner's history)."""
    return np.asarray(tokens, dtype=np.int64).sum(axis=1)


def _cap_probabilities(probs: np.ndarray, cap: float) -> np.ndarray:
    """Water-fill each row of float [G, E] so no entry exceeds ``cap`` (needs cap * E >= 1)."""
    probs = probs / probs.sum(axis=-1, keepdims=True)
    capped = np.zeros(probs.shape, dtype=bool)
    for _ in range(probs.shape[-1]):
        capped |= probs > cap
        if not (probs > cap * (1 + 1e-12)).any():
            break
        free = np.where(capped, 0.0, probs)
        # Mass above the cap goes to the uncapped experts in proportion to their probability.
        budget = 1.0 - cap * capped.sum(axis=-1, keepdims=True)
        probs = np.where(capped, cap, free * budget / np.maximum(free.sum(axis=-1, keepdims=True), 1e-300))
    return np.minimum(probs, cap)


def sample_counts(rng: np.random.Generator, probs: np.ndarray, tokens_per_gpu: int, topk: int) -> np.ndarray:
    """Draw one micro-batch: float [G, E] expert probabilities -> int64 [G, E] counts.

    Each row gets ``tokens_per_gpu * topk`` assignments, none above ``tokens_per_gpu``: probabilities
    are capped at 1/topk, counts drawn multinomially, and any overflow redrawn onto experts with room.
    """
    num_gpus, num_experts = probs.shape
    if topk > num_experts:
        raise ValueError(f"topk={topk} exceeds num_experts={num_experts}")
    probs = _cap_probabilities(np.asarray(probs, dtype=np.float64), 1.0 / topk)
    total = tokens_per_gpu * topk
    counts = rng.multinomial(total, probs).astype(np.int64)
    for s in range(num_gpus):
        excess = int(np.maximum(counts[s] - tokens_per_gpu, 0).sum())
        while excess:
            np.minimum(counts[s], tokens_per_gpu, out=counts[s])
            room = counts[s] < tokens_per_gpu
            p = probs[s] * room
            counts[s] += rng.multinomial(excess, p / p.sum())
            excess = int(np.maximum(counts[s] - tokens_per_gpu, 0).sum())
    return counts


def _per_source(rng: np.random.Generator, expert_probs: np.ndarray, num_gpus: int, source_sigma: float) -> np.ndarray:
    """float [E] -> float [G, E]: each source's probabilities, perturbed lognormally."""
    noise = rng.lognormal(0.0, source_sigma, size=(num_gpus, len(expert_probs))) if source_sigma > 0 else 1.0
    return expert_probs[None, :] * noise


def _sample_sequence(rng, weights_per_mb: np.ndarray, num_gpus, tokens_per_gpu, topk, source_sigma) -> np.ndarray:
    """float [M, E] expert weights per micro-batch -> int64 [M, G, E] counts."""
    out = np.empty((len(weights_per_mb), num_gpus, weights_per_mb.shape[1]), dtype=np.int64)
    for m, weights in enumerate(weights_per_mb):
        out[m] = sample_counts(rng, _per_source(rng, weights, num_gpus, source_sigma), tokens_per_gpu, topk)
    return out


def _check_shape(num_microbatches: int, num_gpus: int, num_experts: int, tokens_per_gpu: int, topk: int) -> None:
    for name, value in (
        ("num_microbatches", num_microbatches),
        ("num_gpus", num_gpus),
        ("num_experts", num_experts),
        ("tokens_per_gpu", tokens_per_gpu),
        ("topk", topk),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if topk > num_experts:
        raise ValueError(f"topk={topk} exceeds num_experts={num_experts}")


def _ar1(rng: np.random.Generator, num_steps: int, size: int, sigma: float, correlation: float) -> np.ndarray:
    """float [num_steps, size]: stationary AR(1) paths with spread ``sigma``."""
    out = np.empty((num_steps, size))
    out[0] = rng.normal(0.0, sigma, size)
    innovation = sigma * np.sqrt(1.0 - correlation**2)
    for m in range(1, num_steps):
        out[m] = correlation * out[m - 1] + rng.normal(0.0, innovation, size)
    return out


def lognormal_drift(
    num_microbatches,
    num_gpus,
    num_experts,
    tokens_per_gpu,
    topk,
    seed,
    *,
    sigma=0.8,
    correlation=0.995,
    noise_sigma=0.25,
    source_sigma=0.3,
) -> np.ndarray:
    """Lognormal expert popularity: log-weights = slow AR(1) drift (spread ``sigma``, per-micro-batch
    coefficient ``correlation``) + i.i.d. per-micro-batch noise (``noise_sigma``, batch content).
    Returns int64 [M, G, E].
    """
    _check_shape(num_microbatches, num_gpus, num_experts, tokens_per_gpu, topk)
    rng = np.random.default_rng(seed)
    logits = _ar1(rng, num_microbatches, num_experts, sigma, correlation)
    logits += rng.normal(0.0, noise_sigma, logits.shape)
    return _sample_sequence(rng, np.exp(logits), num_gpus, tokens_per_gpu, topk, source_sigma)


def zipf_drift(
    num_microbatches,
    num_gpus,
    num_experts,
    tokens_per_gpu,
    topk,
    seed,
    *,
    exponent=1.0,
    swaps_per_microbatch=2,
    source_sigma=0.3,
) -> np.ndarray:
    """Zipf popularity over a random expert ranking; each micro-batch swaps a few neighbouring ranks.

    Returns int64 [M, G, E].
    """
    _check_shape(num_microbatches, num_gpus, num_experts, tokens_per_gpu, topk)
    rng = np.random.default_rng(seed)
    rank_weight = 1.0 / np.arange(1, num_experts + 1) ** exponent
    order = rng.permutation(num_experts)  # order[r] = expert holding rank r
    weights = np.empty((num_microbatches, num_experts))
    for m in range(num_microbatches):
        if m and num_experts > 1:
            for r in rng.integers(0, num_experts - 1, size=swaps_per_microbatch):
                order[r], order[r + 1] = order[r + 1], order[r]
        weights[m, order] = rank_weight
    return _sample_sequence(rng, weights, num_gpus, tokens_per_gpu, topk, source_sigma)


def rotating_hotspot(
    num_microbatches,
    num_gpus,
    num_experts,
    tokens_per_gpu,
    topk,
    seed,
    *,
    hot_width=None,
    hot_factor=6.0,
    period=4,
    background_sigma=0.3,
    source_sigma=0.3,
) -> np.ndarray:
    """A block of ``hot_width`` experts (default max(topk, E//16)) is ``hot_factor`` times hotter; the block
    moves on by ``hot_width`` experts every ``period`` micro-batches. Returns int64 [M, G, E]."""
    _check_shape(num_microbatches, num_gpus, num_experts, tokens_per_gpu, topk)
    rng = np.random.default_rng(seed)
    width = hot_width or max(topk, num_experts // 16)
    background = rng.lognormal(0.0, background_sigma, num_experts)
    weights = np.tile(background, (num_microbatches, 1))
    for m in range(num_microbatches):
        start = (m // period) * width
        weights[m, (start + np.arange(width)) % num_experts] *= hot_factor
    return _sample_sequence(rng, weights, num_gpus, tokens_per_gpu, topk, source_sigma)


def bursty(
    num_microbatches,
    num_gpus,
    num_experts,
    tokens_per_gpu,
    topk,
    seed,
    *,
    sigma=0.5,
    burst_probability=0.3,
    burst_experts=None,
    burst_factor=10.0,
    source_sigma=0.3,
) -> np.ndarray:
    """Static lognormal skew plus short bursts: in each micro-batch, with ``burst_probability``, a random
    set of ``burst_experts`` (default max(1, E//32)) is ``burst_factor`` times hotter. Returns int64 [M, G, E]."""
    _check_shape(num_microbatches, num_gpus, num_experts, tokens_per_gpu, topk)
    rng = np.random.default_rng(seed)
    count = burst_experts or max(1, num_experts // 32)
    weights = np.tile(rng.lognormal(0.0, sigma, num_experts), (num_microbatches, 1))
    for m in range(num_microbatches):
        if rng.random() < burst_probability:
            weights[m, rng.choice(num_experts, size=count, replace=False)] *= burst_factor
    return _sample_sequence(rng, weights, num_gpus, tokens_per_gpu, topk, source_sigma)


def balanced(num_microbatches, num_gpus, num_experts, tokens_per_gpu, topk, seed) -> np.ndarray:
    """Forced-balanced routing (like Megatron's --moe-router-force-load-balancing): every source spreads its
    assignments evenly; the remainder goes to experts on a rotating offset so totals differ by at most
    one per source. ``seed`` only sets the starting offset. Returns int64 [M, G, E]."""
    _check_shape(num_microbatches, num_gpus, num_experts, tokens_per_gpu, topk)
    total = tokens_per_gpu * topk
    base, remainder = divmod(total, num_experts)
    out = np.full((num_microbatches, num_gpus, num_experts), base, dtype=np.int64)
    offset0 = int(np.random.default_rng(seed).integers(num_experts))
    for m in range(num_microbatches):
        for s in range(num_gpus):
            start = offset0 + (m * num_gpus + s) * remainder
            out[m, s, (start + np.arange(remainder)) % num_experts] += 1
    return out


def load_dsv3_expert_loads(path: str | os.PathLike | None = None) -> tuple[np.ndarray, list[str]]:
    """Recorded DeepSeek-V3 expert loads: int64 [scenarios=12, moe_layers=58, experts=256] and scenario names.

    Only the MoE layers (3..60) are returned; the dense layers 0-2 are all zero in the recording.
    ``path`` defaults to $MICROEP_DSV3_LOADS, then ``shared/data/routing`` beside the checkout.
    """
    candidates = (
        [Path(path)]
        if path
        else (
            [Path(os.environ["MICROEP_DSV3_LOADS"])]
            if os.environ.get("MICROEP_DSV3_LOADS")
            else [d / DSV3_FILE_NAME for d in DSV3_DEFAULT_DIRS]
        )
    )
    for candidate in candidates:
        if candidate.is_file():
            with np.load(candidate) as data:
                counts = np.asarray(data["logical_count"], dtype=np.int64)
                names = [str(s) for s in data["scenario"]]
            if counts.ndim != 3 or counts.shape[2] != 256:
                raise ValueError(f"{candidate}: logical_count has shape {counts.shape}, expected [scenarios, 61, 256]")
            moe = counts[:, 3:, :]
            if (moe.sum(axis=2) <= 0).any():
                raise ValueError(f"{candidate}: an MoE layer (3..60) has no recorded tokens")
            return moe, names
    raise FileNotFoundError(f"DeepSeek-V3 expert loads not found (looked for {', '.join(map(str, candidates))})")


def dsv3_derived(
    num_microbatches,
    num_gpus,
    num_experts,
    tokens_per_gpu,
    topk,
    seed,
    *,
    scenario=None,
    layer=None,
    drift_sigma=0.3,
    correlation=0.995,
    noise_sigma=0.25,
    source_sigma=0.3,
    path=None,
) -> np.ndarray:
    """Derived from recorded DeepSeek-V3 loads: one (scenario, MoE layer) load vector, seeded when not
    given, sets the expert probabilities, modulated by slow AR(1) lognormal drift of spread ``drift_sigma``
    plus i.i.d. per-micro-batch noise ``noise_sigma`` (the recording is one aggregate per layer, not a
    time series, so the time structure is synthetic). Needs num_experts=256.
    ``layer`` indexes the MoE layers (0 = model layer 3). Returns int64 [M, G, 256]."""
    _check_shape(num_microbatches, num_gpus, num_experts, tokens_per_gpu, topk)
    loads, names = load_dsv3_expert_loads(path)
    if num_experts != loads.shape[2]:
        raise ValueError(f"dsv3_derived needs num_experts={loads.shape[2]} (the recording's), got {num_experts}")
    rng = np.random.default_rng(seed)
    sc = (
        names.index(scenario)
        if isinstance(scenario, str)
        else (int(rng.integers(len(names))) if scenario is None else int(scenario))
    )
    ly = int(rng.integers(loads.shape[1])) if layer is None else int(layer)
    base = loads[sc, ly] / loads[sc, ly].sum()
    logits = _ar1(rng, num_microbatches, num_experts, drift_sigma, correlation)
    logits += rng.normal(0.0, noise_sigma, logits.shape)
    # A never-routed expert keeps a tiny weight so the row stays a distribution after capping.
    weights = np.maximum(base, 1e-9)[None, :] * np.exp(logits)
    return _sample_sequence(rng, weights, num_gpus, tokens_per_gpu, topk, source_sigma)


LAER_FILE_NAME = "laer_moe_token_counts.csv"


def laer_derived(
    num_microbatches,
    num_gpus,
    num_experts,
    tokens_per_gpu,
    topk,
    seed,
    *,
    step_micro_batches=4,
    sigma=0.5,
    step_sigma=0.25,
    spike_probability=0.01,
    spike_factor=3.0,
    noise_sigma=0.25,
    source_sigma=0.3,
) -> np.ndarray:
    """Derived from the per-rank fluctuation of the LAER-MoE training counts (shared/data/routing/
    laer_moe_token_counts.csv, FSDP and LAER runs): there a rank's tokens in one iteration are
    1.22-1.29x the mean of its previous three iterations at p90 and 1.6-1.8x at p99. Here an
    iteration is a step of ``step_micro_batches`` micro-batches and a rank's load is what its home
    experts receive under Megatron's contiguous layout. Static lognormal skew (``sigma``); every step
    each expert gets a lognormal shock (``step_sigma``) and, with ``spike_probability``, is
    ``spike_factor`` times hotter for the whole step; every micro-batch adds i.i.d. noise
    (``noise_sigma``). The defaults reproduce the recorded p90 and p99 at 64 GPUs x 256 experts
    (tests/planning/test_workloads.py checks it; per-expert counts are not in the recording, so only
    this statistic is matched). Returns int64 [M, G, E]."""
    _check_shape(num_microbatches, num_gpus, num_experts, tokens_per_gpu, topk)
    if step_micro_batches < 1:
        raise ValueError(f"step_micro_batches must be >= 1, got {step_micro_batches}")
    rng = np.random.default_rng(seed)
    steps = -(-num_microbatches // step_micro_batches)
    shock = rng.normal(0.0, step_sigma, (steps, num_experts))
    shock += np.log(spike_factor) * (rng.random((steps, num_experts)) < spike_probability)
    logits = np.repeat(shock, step_micro_batches, axis=0)[:num_microbatches]
    logits += rng.normal(0.0, noise_sigma, logits.shape)
    weights = rng.lognormal(0.0, sigma, num_experts)[None, :] * np.exp(logits)
    return _sample_sequence(rng, weights, num_gpus, tokens_per_gpu, topk, source_sigma)


def load_laer_rank_counts(path: str | os.PathLike | None = None) -> dict[tuple[str, str], list[np.ndarray]]:
    """Recorded LAER-MoE per-rank token counts: (method, model) -> per layer float64 [iterations, ranks].

    ``path`` defaults to $MICROEP_LAER_COUNTS, then ``shared/data/routing`` beside the checkout.
    """
    env = os.environ.get("MICROEP_LAER_COUNTS")
    candidates = [Path(path)] if path else [Path(env)] if env else [d / LAER_FILE_NAME for d in DSV3_DEFAULT_DIRS]
    for candidate in candidates:
        if candidate.is_file():
            with open(candidate, encoding="utf-8") as f:
                header = f.readline().strip().split(",")
                rows = [line.rstrip("\n").split(",") for line in f if line.strip()]
            col = {name: i for i, name in enumerate(header)}
            keys = np.array([(r[col["method"]], r[col["model_name"]], r[col["layer"]]) for r in rows])
            numbers = np.array([[r[col["iter"]], r[col["rank"]], r[col["token_num"]]] for r in rows], dtype=np.int64)
            groups, group_of = np.unique(keys, axis=0, return_inverse=True)
            out: dict[tuple[str, str], list[np.ndarray]] = {}
            for g, (method, model, _layer) in enumerate(groups):
                it, rank, count = numbers[group_of.ravel() == g].T
                counts = np.zeros((it.max() + 1, rank.max() + 1))
                counts[it, rank] = count
                out.setdefault((str(method), str(model)), []).append(counts)
            return out
    raise FileNotFoundError(f"LAER-MoE token counts not found (looked for {', '.join(map(str, candidates))})")


def rank_fluctuation(loads: np.ndarray, window: int = 3) -> np.ndarray:
    """float64 [(T - window) * R]: each rank's load over the mean of its previous ``window``
    iterations, for loads float [T, R] (iterations x ranks). The statistic the LAER recording has."""
    loads = np.asarray(loads, dtype=np.float64)
    history = np.stack([loads[t - window : t].mean(axis=0) for t in range(window, len(loads))])
    return (loads[window:] / history).ravel()


WorkloadFn = Callable[..., np.ndarray]

# name -> generator(num_microbatches, num_gpus, num_experts, tokens_per_gpu, topk, seed, **params) -> int64 [M, G, E]
WORKLOADS: dict[str, WorkloadFn] = {
    "lognormal_drift": lognormal_drift,
    "zipf_drift": zipf_drift,
    "rotating_hotspot": rotating_hotspot,
    "bursty": bursty,
    "balanced": balanced,
    "dsv3_derived": dsv3_derived,
    "laer_derived": laer_derived,
}


def generate(
    name: str,
    num_microbatches: int,
    num_gpus: int,
    num_experts: int,
    tokens_per_gpu: int,
    topk: int,
    seed: int,
    **params,
) -> np.ndarray:
    """Look up ``name`` in WORKLOADS and run it. Returns int64 [M, G, E]."""
    try:
        fn = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(sorted(WORKLOADS))}") from None
    return fn(num_microbatches, num_gpus, num_experts, tokens_per_gpu, topk, seed, **params)


# --- Megatron's token-imbalance benchmark workloads W0-W7 -----------------------------------------------
# Reproduced from their definitions in Megatron-LM PR 7488 (benchmarks/moe/token_imbalance, open at the
# time of writing); the random draws are numpy's, not torch's, so counts match in distribution only.
# Each micro-batch m plays the benchmark's "step"; draws are seeded per (workload, seed, m) and every
# source GPU routes the same tokens, as in the benchmark (W4: odd sources have one token fewer).


def _megatron_draw(
    rng: np.random.Generator, pool: np.ndarray, num_tokens: int, topk: int, num_experts: int
) -> np.ndarray:
    """``num_tokens`` tokens each take ``topk`` distinct experts uniformly from ``pool`` -> int64 [E]."""
    if topk > len(pool):
        raise ValueError(f"topk={topk} exceeds the candidate pool of {len(pool)} experts")
    if num_tokens == 0:
        return np.zeros(num_experts, dtype=np.int64)
    picks = np.argpartition(rng.random((num_tokens, len(pool))), topk - 1, axis=1)[:, :topk]
    return np.bincount(pool[picks].ravel(), minlength=num_experts).astype(np.int64)


def _megatron_workload(index: int):
    def generator(num_microbatches, num_gpus, num_experts, tokens_per_gpu, topk, seed) -> np.ndarray:
        _check_shape(num_microbatches, num_gpus, num_experts, tokens_per_gpu, topk)
        everyone = np.arange(num_experts)
        hot_width = max(topk, num_experts // 4)
        hot = everyone[:hot_width] % num_experts
        out = np.empty((num_microbatches, num_gpus, num_experts), dtype=np.int64)
        t = tokens_per_gpu
        every_fourth = -(-t // 4)  # tokens 0, 4, 8, ... draw from every expert
        for m in range(num_microbatches):
            rng = np.random.default_rng([seed, index, m])
            ragged = None
            if index == 0:  # round robin: token t takes experts (t*k + j) mod E
                ids = (np.arange(t)[:, None] * topk + np.arange(topk)[None, :]) % num_experts
                counts = np.bincount(ids.ravel(), minlength=num_experts)
            elif index in (1, 2, 6):  # 3/4 of tokens from a hot block, every 4th from all
                block = hot if index != 6 else (((m // 3) * hot_width) + np.arange(hot_width)) % num_experts
                counts = _megatron_draw(rng, block, t - every_fourth, topk, num_experts) + _megatron_draw(
                    rng, everyone, every_fourth, topk, num_experts
                )
            elif index == 3:  # the same heat spread over the even experts
                spread = np.unique((2 * np.arange(max(topk, num_experts // 2))) % num_experts)
                pool = spread if len(spread) >= topk else everyone
                counts = _megatron_draw(rng, pool, t - every_fourth, topk, num_experts) + _megatron_draw(
                    rng, everyone, every_fourth, topk, num_experts
                )
            elif index == 4:  # uniform; odd sources route one token fewer (ragged sources)
                last = _megatron_draw(rng, everyone, 1, topk, num_experts)
                counts = _megatron_draw(rng, everyone, t - 1, topk, num_experts) + last
                ragged = counts - last
            elif index == 5:  # only the upper half of the experts is ever chosen
                live = everyone[num_experts // 2 :] if num_experts // 2 < num_experts else everyone
                counts = _megatron_draw(rng, live, t, topk, num_experts)
            else:  # 7: every 4th micro-batch is a burst: even tokens from the hot block
                if m % 4 == 3:
                    half = -(-t // 2)
                    counts = _megatron_draw(rng, hot, half, topk, num_experts) + _megatron_draw(
                        rng, everyone, t - half, topk, num_experts
                    )
                else:
                    counts = _megatron_draw(rng, everyone, t, topk, num_experts)
            out[m] = counts
            if ragged is not None:
                out[m, 1::2] = ragged
        return out

    generator.__name__ = f"megatron_w{index}"
    generator.__doc__ = f"Megatron token-imbalance workload W{index} (PR 7488), by definition. Returns int64 [M, G, E]."
    return generator


MEGATRON_WORKLOADS = {f"megatron_w{i}": _megatron_workload(i) for i in range(8)}
WORKLOADS.update(MEGATRON_WORKLOADS)
