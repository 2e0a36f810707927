"""Trace readers and writers: round trips, Megatron schemas, and errors that name the record and field."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_microep.planning import workloads
from megatron_microep.simulator.traces import (
    MTP_LAYER_BASE,
    NativeTraceWriter,
    TraceError,
    TraceRecord,
    layer_label,
    open_trace,
    parse_generator_spec,
    read_native,
    spread_over_sources,
    write_jsonl,
)

SEED = int(os.environ.get("MICROEP_TEST_SEED", np.random.SeedSequence().entropy % 2**32))


def setup_module():
    print(f"trace tests seed: {SEED} (rerun with MICROEP_TEST_SEED={SEED})")


def random_records(rng, gpus=4, experts=6, steps=2, mbs=3, layers=2, peak=70000):
    out = []
    for step in range(steps):
        for mb in range(mbs):
            for layer in range(layers):
                out.append(TraceRecord(step, mb, layer, rng.integers(0, peak, size=(gpus, experts))))
    return out


def same(a, b):
    assert [(r.step, r.micro_batch, r.layer) for r in a] == [(r.step, r.micro_batch, r.layer) for r in b]
    for x, y in zip(a, b):
        assert (x.tokens == y.tokens).all()


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("peak", [200, 60000, 2**40])
def test_native_round_trip_and_append(tmp_path, compress, peak):
    rng = np.random.default_rng(SEED)
    records = random_records(rng, peak=peak)
    path = tmp_path / "t.mept"
    with NativeTraceWriter(path, 4, 6, meta={"who": "test"}, compress=compress) as w:
        for r in records[:5]:
            w.write(r.step, r.micro_batch, r.layer, r.tokens)
    with NativeTraceWriter(path, 4, 6, compress=compress) as w:  # append-only: a second writer continues
        for r in records[5:]:
            w.write(r.step, r.micro_batch, r.layer, r.tokens)
    info, it = open_trace(str(path))
    assert (info.num_gpus, info.num_experts, info.kind) == (4, 6, "native")
    assert info.meta == {"who": "test"}
    same(records, list(it))


def test_native_is_compact(tmp_path):
    tokens = workloads.generate("lognormal_drift", 4, 16, 64, 2048, 4, SEED)
    path = tmp_path / "t.mept"
    with NativeTraceWriter(path, 16, 64) as w:
        for m, t in enumerate(tokens):
            w.write(0, m, 0, t)
    assert path.stat().st_size < tokens.size * 2 + 200  # at most 2 bytes per count here


def test_native_errors_name_the_record(tmp_path):
    rng = np.random.default_rng(SEED)
    records = random_records(rng)
    path = tmp_path / "t.mept"
    with NativeTraceWriter(path, 4, 6) as w:
        for r in records[:3]:
            w.write(r.step, r.micro_batch, r.layer, r.tokens)
    data = path.read_bytes()
    (tmp_path / "cut.mept").write_bytes(data[:-5])
    with pytest.raises(TraceError, match=r"cut.mept: record 2 \(byte \d+\): truncated payload"):
        list(read_native(tmp_path / "cut.mept")[1])
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    (tmp_path / "bad.mept").write_bytes(bytes(flipped))
    with pytest.raises(TraceError, match="record 2 .*checksum mismatch"):
        list(read_native(tmp_path / "bad.mept")[1])
    with pytest.raises(TraceError, match="existing trace is 4 GPUs x 6 experts"):
        NativeTraceWriter(path, 4, 7)
    with pytest.raises(TraceError, match="shape"):
        with NativeTraceWriter(tmp_path / "x.mept", 2, 2) as w:
            w.write(0, 0, 0, np.zeros((2, 3), dtype=np.int64))


def test_jsonl_round_trip(tmp_path):
    records = random_records(np.random.default_rng(SEED), peak=1000)
    write_jsonl(tmp_path / "t.jsonl", records)
    info, it = open_trace(str(tmp_path / "t.jsonl"))
    assert (info.num_gpus, info.num_experts, info.kind) == (4, 6, "jsonl")
    same(records, list(it))


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"step": 0, "micro_batch": 0, "layer": 0}', "line 2: missing field 'tokens'"),
        ('{"micro_batch": 0, "layer": 0, "tokens": [[1, 2], [3, 4]]}', "line 2: missing field 'step'"),
        (
            '{"step": -1, "micro_batch": 0, "layer": 0, "tokens": [[1, 2], [3, 4]]}',
            "line 2: field 'step' must be a non-negative integer, got -1",
        ),
        ('{"step": 0, "micro_batch": 1.5, "layer": 0, "tokens": [[1, 2], [3, 4]]}', "field 'micro_batch'"),
        ('{"step": 0, "micro_batch": 0, "layer": 0, "tokens": [[1, 2], [3]]}', r"field 'tokens\[1\]' has 1 entries"),
        ('{"step": 0, "micro_batch": 0, "layer": 0, "tokens": [[1, 2], [3, 4], [5, 6]]}', "has 3 rows, expected 2"),
        (
            '{"step": 0, "micro_batch": 0, "layer": 0, "tokens": [[1, 2.5], [3, 4]]}',
            r"field 'tokens\[0\]\[1\]' must be an integer, got 2.5",
        ),
        (
            '{"step": 0, "micro_batch": 0, "layer": 0, "tokens": [[1, true], [3, 4]]}',
            r"tokens\[0\]\[1\]' must be an integer",
        ),
        (
            '{"step": 0, "micro_batch": 0, "layer": 0, "tokens": [[1, 2], [3, -4]]}',
            r"field 'tokens\[1\]\[1\]' must be non-negative",
        ),
        ('{"step": 0, "micro_batch": 0, "layer": 0, "tokens": [[1, 2], [3, 4]]', "line 2: not valid JSON"),
        ("[1, 2]", "line 2: expected a JSON object"),
    ],
)
def test_jsonl_errors_name_line_and_field(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"step": 0, "micro_batch": 0, "layer": 0, "tokens": [[1, 2], [3, 4]]}\n' + line + "\n")
    info, it = open_trace(str(path))
    with pytest.raises(TraceError, match=message):
        list(it)


def write_router_trace(folder, routing, num_tokens, topk, mtp=False):
    """Files in Megatron's --moe-routing-trace-path schema: router_trace_rank{r}.jsonl, one record per
    forward call (so one per micro-batch in training), top_indices [num_tokens][topk]."""
    folder.mkdir(exist_ok=True)
    for rank, calls in routing.items():
        with open(folder / f"router_trace_rank{rank}.jsonl", "w") as f:
            for step, layer, ids in calls:
                rec = {
                    "step": step,
                    "stage": "pre_dispatch",
                    "block": "decoder",
                    "layer": layer,
                    "rank": rank,
                    "num_tokens": num_tokens,
                    "topk": topk,
                    "top_indices": ids.tolist(),
                }
                if mtp and layer == 99:
                    rec.update(block="mtp", mtp_idx=0, layer=1)
                f.write(json.dumps(rec) + "\n")


def test_megatron_router_trace(tmp_path):
    rng = np.random.default_rng(SEED)
    experts, topk, tokens = 8, 2, 16
    calls = {}
    expected = {}
    for rank in range(4):
        calls[rank] = []
        for step in (5, 6):
            for mb in range(2):
                for layer in (1, 2, 99):
                    ids = np.stack([rng.choice(experts, topk, replace=False) for _ in range(tokens)])
                    calls[rank].append((step, layer, ids))
                    expected[(step, mb, layer, rank)] = np.bincount(ids.ravel(), minlength=experts)
    write_router_trace(tmp_path / "rt", calls, tokens, topk, mtp=True)
    with pytest.raises(TraceError, match="pass --num-experts"):
        open_trace(str(tmp_path / "rt"))
    info, it = open_trace(str(tmp_path / "rt"), num_experts=experts)
    assert (info.num_gpus, info.num_experts, info.kind) == (4, 8, "megatron-routing-trace")
    records = list(it)
    assert len(records) == 12
    for r in records:
        layer = 99 if r.layer == MTP_LAYER_BASE + 1 else r.layer
        for s in range(4):
            assert (r.tokens[s] == expected[(r.step, r.micro_batch, layer, s)]).all()
    assert layer_label(MTP_LAYER_BASE + 1) == "mtp0.1"
    _, it = open_trace(str(tmp_path / "rt"), num_experts=experts, ranks=[2, 0])
    first = next(it)
    assert (first.tokens[0] == expected[(5, 0, 1, 2)]).all()
    _, it = open_trace(str(tmp_path / "rt"), num_experts=4)
    with pytest.raises(
        TraceError, match=r"router_trace_rank0.jsonl: line 1: field 'top_indices\[\d+\]\[\d+\]' = \d+ is not"
    ):
        list(it)


def test_megatron_router_trace_rank_mismatch(tmp_path):
    ids = np.zeros((4, 2), dtype=np.int64)
    ids[:, 1] = 1
    write_router_trace(tmp_path / "rt", {0: [(0, 1, ids), (0, 2, ids)], 1: [(0, 1, ids), (0, 3, ids)]}, 4, 2)
    _, it = open_trace(str(tmp_path / "rt"), num_experts=4)
    with pytest.raises(TraceError, match=r"router_trace_rank1.jsonl: line 2: \(step, layer\) \(0, 3\) does not match"):
        list(it)
    write_router_trace(tmp_path / "rt2", {0: [(0, 1, ids), (0, 2, ids)], 1: [(0, 1, ids)]}, 4, 2)
    _, it = open_trace(str(tmp_path / "rt2"), num_experts=4)
    with pytest.raises(TraceError, match="ends after 1 records"):
        list(it)
    with pytest.raises(TraceError, match="no file for rank 5"):
        open_trace(str(tmp_path / "rt"), num_experts=4, ranks=[0, 5])


def test_megatron_tokens_per_expert(tmp_path):
    """--save-tokens-per-expert-interval schema: {save}/tokens_per_expert/rank{r}.jsonl, one line per
    (iter, layer) with tpe [micro-batches][local experts] received by that rank."""
    rng = np.random.default_rng(SEED)
    folder = tmp_path / "save" / "tokens_per_expert"
    folder.mkdir(parents=True)
    local = 3
    loads = {}
    for rank in range(4):
        with open(folder / f"rank{rank}.jsonl", "w") as f:
            for it in (10, 20):
                for layer in (0, 1):
                    tpe = rng.integers(0, 500, size=(2, local))
                    loads[(it, layer, rank)] = tpe
                    f.write(json.dumps({"iter": it, "block": "decoder", "layer": layer, "tpe": tpe.tolist()}) + "\n")
    info, it = open_trace(str(tmp_path / "save"))
    assert (info.num_gpus, info.num_experts, info.per_source_known) == (4, 12, False)
    records = list(it)
    assert [(r.step, r.micro_batch, r.layer) for r in records] == [
        (s, m, layer) for s in (10, 20) for layer in (0, 1) for m in (0, 1)
    ]
    for r in records:
        expert_load = np.concatenate([loads[(r.step, r.layer, rank)][r.micro_batch] for rank in range(4)])
        assert (r.tokens.sum(axis=0) == expert_load).all(), "expert totals are exact"
        assert (r.tokens.max(axis=0) - r.tokens.min(axis=0) <= 1).all(), "sources unknown: spread evenly"
    with open(folder / "rank3.jsonl", "a") as f:
        f.write(json.dumps({"iter": 30, "block": "decoder", "layer": 0, "tpe": [[1, 2, 3]]}) + "\n")
    with pytest.raises(TraceError, match="rank3.jsonl ends|has more"):
        list(open_trace(str(folder))[1])


def test_tokens_per_expert_field_errors(tmp_path):
    folder = tmp_path / "tokens_per_expert"
    folder.mkdir()
    (folder / "rank0.jsonl").write_text(json.dumps({"iter": 1, "layer": 0, "tpe": [[1, 2]]}) + "\n")
    (folder / "rank1.jsonl").write_text(json.dumps({"iter": 1, "layer": 0, "tpe": [[1, 2], [3, 4]]}) + "\n")
    with pytest.raises(TraceError, match="different numbers of micro-batches"):
        open_trace(str(folder))
    (folder / "rank1.jsonl").write_text(json.dumps({"iter": 1, "layer": 0}) + "\n")
    with pytest.raises(TraceError, match="rank1.jsonl: line 1: missing field 'tpe'"):
        open_trace(str(folder))


def test_spread_over_sources_conserves():
    load = np.array([0, 1, 7, 13, 64])
    spread = spread_over_sources(load, 4)
    assert (spread.sum(axis=0) == load).all()
    assert (spread.max(axis=0) - spread.min(axis=0) <= 1).all()


def test_generator_specs():
    info, it = open_trace(
        "gen:megatron_w1:gpus=4,experts=8,layers=2,micro_batches=6,micro_batches_per_step=3,tokens=128,topk=2"
    )
    records = list(it)
    assert (info.num_gpus, info.num_experts) == (4, 8)
    assert [(r.step, r.micro_batch, r.layer) for r in records[:4]] == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0)]
    assert len(records) == 12 and all(r.tokens.sum() == 4 * 128 * 2 for r in records)
    assert parse_generator_spec("gen:bursty:burst_factor=4.5,seed=3")[1:] == (
        {**parse_generator_spec("gen:x")[1], "seed": 3},
        {"burst_factor": 4.5},
    )
    with pytest.raises(TraceError, match="unknown workload 'nope'"):
        open_trace("gen:nope")
    with pytest.raises(TraceError, match="gpus must be a positive integer"):
        open_trace("gen:balanced:gpus=0")
    with pytest.raises(TraceError, match="unexpected keyword argument 'wobble'"):
        open_trace("gen:bursty:wobble=2")
    with pytest.raises(TraceError, match="no such file"):
        open_trace("/nonexistent/trace.jsonl")


def test_megatron_workloads_follow_their_definitions():
    t = workloads.generate("megatron_w0", 3, 2, 8, 128, 2, SEED)
    assert (t == 32).all(), "W0 round robin is exactly balanced"
    big = workloads.generate("megatron_w1", 2, 1, 8, 200_000, 2, SEED).sum(axis=1)
    # 3/4 of tokens take both hot experts (pool of 2), 1/4 draw 2 of 8: expert 0 gets 0.8125 T vs mean 0.25 T.
    assert np.allclose(big.max(axis=1) / big.mean(axis=1), 3.25, atol=0.02)
    assert (big[:, :2] > big[:, 2:].max()).all()
    w5 = workloads.generate("megatron_w5", 2, 2, 8, 128, 2, SEED)
    assert (w5[:, :, :4] == 0).all() and (w5[:, :, 4:] > 0).all()
    w4 = workloads.generate("megatron_w4", 2, 4, 8, 128, 2, SEED)
    assert (w4[:, 0::2].sum(axis=2) == 256).all() and (w4[:, 1::2].sum(axis=2) == 254).all()
    w6 = workloads.generate("megatron_w6", 7, 1, 16, 4000, 2, SEED)[:, 0]
    assert [int(np.argmax(w6[m])) // 4 for m in (0, 3, 6)] == [0, 1, 2], "hot block moves every 3 micro-batches"
    w7 = workloads.generate("megatron_w7", 8, 1, 8, 4000, 2, SEED)[:, 0]
    ratio = w7.max(axis=1) / w7.mean(axis=1)
    assert (ratio[[3, 7]] > 2.0).all() and (np.delete(ratio, [3, 7]) < 1.2).all()
    w3 = workloads.generate("megatron_w3", 1, 1, 8, 8000, 2, SEED)[0, 0]
    assert w3[0::2].min() > w3[1::2].max(), "W3's heat sits on the even experts"
    for i in range(8):
        t = workloads.generate(f"megatron_w{i}", 4, 3, 16, 64, 4, SEED)
        assert (t.max(axis=2) <= 64).all() and (t[:, 0].sum(axis=1) == 256).all()
