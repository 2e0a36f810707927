"""Routing traces: readers, writers and generators, all streamed one record at a time.

A record is one (step, micro-batch, layer) with ``tokens`` int64 [G, E]: ``tokens[s, e]`` tokens on
GPU ``s`` routed to expert ``e``. Sources (``open_trace`` picks by the spec):

* ``*.mept``: the plugin's own compact append-only binary format (docs/formats.md, "Trace formats").
* ``*.jsonl`` / ``*.json``: JSON Lines, one ``{"step", "micro_batch", "layer", "tokens"}`` per line.
* a directory of Megatron ``--moe-routing-trace-path`` output (``router_trace_rank*.jsonl``: per-rank
  top-k expert ids per token); needs the number of experts.
* a directory of Megatron ``--save-tokens-per-expert-interval`` output (``tokens_per_expert/rank*.jsonl``
  or the folder itself: per-rank received tokens per local expert); per-source counts are not
  recorded there, so each expert's tokens are spread evenly over the sources (``per_source_known``
  is False and the report says so).
* ``gen:WORKLOAD[:key=value,...]``: a seeded workload from ``planning.workloads``, layer by layer.

Every malformed record raises TraceError naming the file, the record (line or index) and the field.
Layers are ints; Megatron MTP layers get ids ``MTP_LAYER_BASE * (mtp_idx + 1) + layer``.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_microep.validation import count_matrix

MTP_LAYER_BASE = 1_000_000
NATIVE_MAGIC = b"MEPTRC01"
RECORD_MAGIC = b"MEPR"
# magic, payload bytes, step, micro_batch, layer, element width, compression, reserved, crc32 of payload
_RECORD_HEADER = struct.Struct("<4sIqiiBBHI")
_WIDTHS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class TraceError(ValueError):
    """A trace that cannot be read: the message names the file, the record and the field."""


@dataclass(frozen=True)
class TraceRecord:
    step: int
    micro_batch: int
    layer: int
    tokens: np.ndarray  # int64 [G, E]


@dataclass(frozen=True)
class TraceInfo:
    num_gpus: int
    num_experts: int
    kind: str
    description: str
    per_source_known: bool = True
    meta: dict = field(default_factory=dict)


def layer_label(layer: int) -> str:
    if layer >= MTP_LAYER_BASE:
        return f"mtp{layer // MTP_LAYER_BASE - 1}.{layer % MTP_LAYER_BASE}"
    return str(layer)


# --- native binary format ------------------------------------------------------------------------


class NativeTraceWriter:
    """Append records to a ``.mept`` file; creates it with its header, or checks the existing header.

    Each record is self-delimiting (length and CRC32), so a reader detects a torn last record.
    """

    def __init__(
        self, path: str | os.PathLike, num_gpus: int, num_experts: int, meta: dict | None = None, compress: bool = True
    ):
        self.path = Path(path)
        self.num_gpus, self.num_experts, self.compress = num_gpus, num_experts, compress
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists:
            with open(self.path, "rb") as f:
                header = _read_native_header(f, self.path)
            if (header["num_gpus"], header["num_experts"]) != (num_gpus, num_experts):
                raise TraceError(
                    f"{self.path}: existing trace is {header['num_gpus']} GPUs x "
                    f"{header['num_experts']} experts, cannot append {num_gpus} x {num_experts}"
                )
        self._file = open(self.path, "ab")
        if not exists:
            head = json.dumps({"num_gpus": num_gpus, "num_experts": num_experts, "meta": meta or {}}).encode()
            self._file.write(NATIVE_MAGIC + struct.pack("<I", len(head)) + head)

    def write(self, step: int, micro_batch: int, layer: int, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.shape != (self.num_gpus, self.num_experts):
            raise TraceError(
                f"{self.path}: record tokens shape {list(tokens.shape)}, expected [{self.num_gpus}, {self.num_experts}]"
            )
        if tokens.size and tokens.min() < 0:
            raise TraceError(f"{self.path}: record tokens must be non-negative")
        peak = int(tokens.max(initial=0))
        width = next(w for w in (1, 2, 4, 8) if peak < 256**w)
        payload = np.ascontiguousarray(tokens, dtype=np.dtype(_WIDTHS[width]).newbyteorder("<")).tobytes()
        if self.compress:
            payload = zlib.compress(payload, 1)
        self._file.write(
            _RECORD_HEADER.pack(
                RECORD_MAGIC, len(payload), step, micro_batch, layer, width, int(self.compress), 0, zlib.crc32(payload)
            )
        )
        self._file.write(payload)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_native_header(f, path: Path) -> dict:
    magic = f.read(len(NATIVE_MAGIC))
    if magic != NATIVE_MAGIC:
        raise TraceError(f"{path}: not a microep trace (magic {magic!r}, expected {NATIVE_MAGIC!r})")
    raw = f.read(4)
    if len(raw) < 4:
        raise TraceError(f"{path}: header truncated")
    (length,) = struct.unpack("<I", raw)
    text = f.read(length)
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TraceError(f"{path}: header is not valid JSON") from None
    for key in ("num_gpus", "num_experts"):
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TraceError(f"{path}: header field '{key}' must be a positive integer, got {value!r}")
    return header


def read_native(path: str | os.PathLike) -> tuple[TraceInfo, Iterator[TraceRecord]]:
    path = Path(path)
    f = open(path, "rb")
    try:
        header = _read_native_header(f, path)
    except Exception:
        f.close()
        raise
    num_gpus, num_experts = header["num_gpus"], header["num_experts"]
    info = TraceInfo(num_gpus, num_experts, "native", f"{path.name} (microep trace)", meta=header.get("meta", {}))

    def records() -> Iterator[TraceRecord]:
        with f:
            index = 0
            while True:
                offset = f.tell()
                head = f.read(_RECORD_HEADER.size)
                if not head:
                    return
                where = f"{path}: record {index} (byte {offset})"
                if len(head) < _RECORD_HEADER.size:
                    raise TraceError(f"{where}: truncated record header ({len(head)} of {_RECORD_HEADER.size} bytes)")
                magic, length, step, mb, layer, width, compressed, _, crc = _RECORD_HEADER.unpack(head)
                if magic != RECORD_MAGIC:
                    raise TraceError(f"{where}: bad record magic {magic!r}")
                if width not in _WIDTHS:
                    raise TraceError(f"{where}: field 'width' must be 1, 2, 4 or 8, got {width}")
                if compressed not in (0, 1):
                    raise TraceError(f"{where}: field 'compression' must be 0 or 1, got {compressed}")
                if step < 0 or mb < 0 or layer < 0:
                    raise TraceError(f"{where}: step, micro_batch and layer must be >= 0, got {step}, {mb}, {layer}")
                payload = f.read(length)
                if len(payload) < length:
                    raise TraceError(f"{where}: truncated payload ({len(payload)} of {length} bytes)")
                if zlib.crc32(payload) != crc:
                    raise TraceError(f"{where}: payload checksum mismatch (corrupted)")
                if compressed:
                    try:
                        payload = zlib.decompress(payload)
                    except zlib.error as err:
                        raise TraceError(f"{where}: payload does not decompress ({err})") from None
                expected = num_gpus * num_experts * width
                if len(payload) != expected:
                    raise TraceError(
                        f"{where}: field 'tokens' has {len(payload)} bytes, expected {expected} "
                        f"([{num_gpus}, {num_experts}] x {width})"
                    )
                tokens = np.frombuffer(payload, dtype=np.dtype(_WIDTHS[width]).newbyteorder("<"))
                if width == 8 and (tokens >= 2**63).any():
                    raise TraceError(f"{where}: field 'tokens' holds a count above 2**63")
                yield TraceRecord(step, mb, layer, tokens.astype(np.int64).reshape(num_gpus, num_experts))
                index += 1

    return info, records()


# --- JSON Lines ------------------------------------------------------------------------------------


def _int_field(obj: dict, key: str, where: str) -> int:
    if key not in obj:
        raise TraceError(f"{where}: missing field '{key}'")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TraceError(f"{where}: field '{key}' must be a non-negative integer, got {value!r}")
    return value


def _count_matrix(value, where: str, name: str, rows: int | None, cols: int | None) -> np.ndarray:
    try:
        return count_matrix(value, name, rows, cols)
    except ValueError as err:
        raise TraceError(f"{where}: {err}") from None


def _json_line(line: str, where: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise TraceError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object")
    return obj


def _nonblank_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line


def read_jsonl(path: str | os.PathLike) -> tuple[TraceInfo, Iterator[TraceRecord]]:
    path = Path(path)
    lines = _nonblank_lines(path)
    try:
        number, first_line = next(lines)
    except StopIteration:
        raise TraceError(f"{path}: empty trace (no records)") from None
    first = _parse_jsonl_record(first_line, f"{path}: line {number}", None, None)
    num_gpus, num_experts = first.tokens.shape
    info = TraceInfo(num_gpus, num_experts, "jsonl", f"{path.name} (JSON Lines)")

    def records() -> Iterator[TraceRecord]:
        yield first
        for n, line in lines:
            yield _parse_jsonl_record(line, f"{path}: line {n}", num_gpus, num_experts)

    return info, records()


def _parse_jsonl_record(line: str, where: str, rows: int | None, cols: int | None) -> TraceRecord:
    obj = _json_line(line, where)
    step = _int_field(obj, "step", where)
    mb = _int_field(obj, "micro_batch", where)
    layer = _int_field(obj, "layer", where)
    if "tokens" not in obj:
        raise TraceError(f"{where}: missing field 'tokens'")
    return TraceRecord(step, mb, layer, _count_matrix(obj["tokens"], where, "tokens", rows, cols))


def write_jsonl(path: str | os.PathLike, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(
                json.dumps(
                    {
                        "step": r.step,
                        "micro_batch": r.micro_batch,
                        "layer": r.layer,
                        "tokens": np.asarray(r.tokens).tolist(),
                    }
                )
                + "\n"
            )


# --- Megatron recordings ----------------------------------------------------------------------------


def _rank_files(folder: Path, pattern: str, ranks: list[int] | None) -> list[tuple[int, Path]]:
    found = {}
    for p in folder.iterdir():
        m = re.fullmatch(pattern, p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise TraceError(f"{folder}: no files matching {pattern}")
    if ranks is None:
        return sorted(found.items())
    missing = [r for r in ranks if r not in found]
    if missing:
        raise TraceError(f"{folder}: no file for rank {missing[0]} (found ranks {sorted(found)})")
    return [(r, found[r]) for r in ranks]


def _layer_id(obj: dict, where: str) -> int:
    block = obj.get("block", "decoder")
    layer = _int_field(obj, "layer", where)
    if block == "decoder":
        return layer
    if block == "mtp":
        return MTP_LAYER_BASE * (_int_field(obj, "mtp_idx", where) + 1) + layer
    raise TraceError(f"{where}: field 'block' must be 'decoder' or 'mtp', got {block!r}")


def _zip_rank_lines(files: list[tuple[int, Path]]):
    """Yield, per record position, [(rank, where, parsed object)] across all rank files; every file
    must have the same number of records."""
    iters = [(rank, path, _nonblank_lines(path)) for rank, path in files]
    index = 0
    while True:
        row, done = [], []
        for rank, path, it in iters:
            try:
                number, line = next(it)
            except StopIteration:
                done.append(path)
                continue
            where = f"{path}: line {number}"
            row.append((rank, where, _json_line(line, where)))
        if done and row:
            raise TraceError(
                f"{done[0]} ends after {index} records but {row[0][1]} has more "
                "(rank files must record the same steps and layers)"
            )
        if not row:
            return
        yield row
        index += 1


def read_megatron_router_trace(
    folder: str | os.PathLike, num_experts: int | None, ranks: list[int] | None = None
) -> tuple[TraceInfo, Iterator[TraceRecord]]:
    """``--moe-routing-trace-path`` output: ``router_trace_rank{r}.jsonl``, one record per (step, block,
    layer) forward call, ``top_indices`` [num_tokens][topk]. Rank files (all, or ``ranks`` in that order)
    are the EP group's GPUs; repeated (step, layer) records are the step's micro-batches in order."""
    folder = Path(folder)
    if num_experts is None or num_experts < 1:
        raise TraceError(f"{folder}: Megatron routing traces do not record the number of experts; pass --num-experts")
    files = _rank_files(folder, r"router_trace_rank(\d+)\.jsonl", ranks)
    num_gpus = len(files)
    info = TraceInfo(
        num_gpus,
        num_experts,
        "megatron-routing-trace",
        f"{folder.name}/ (Megatron --moe-routing-trace-path, ranks {[r for r, _ in files]})",
    )

    def records() -> Iterator[TraceRecord]:
        seen: dict[tuple[int, int], int] = {}
        for row in _zip_rank_lines(files):
            keys = []
            tokens = np.zeros((num_gpus, num_experts), dtype=np.int64)
            for s, (_rank, where, obj) in enumerate(row):
                step = _int_field(obj, "step", where)
                layer = _layer_id(obj, where)
                keys.append((step, layer))
                if "top_indices" not in obj:
                    raise TraceError(f"{where}: missing field 'top_indices'")
                topk = _int_field(obj, "topk", where)
                num_tokens = _int_field(obj, "num_tokens", where)
                if num_tokens == 0:
                    continue
                ids = _count_matrix(obj["top_indices"], where, "top_indices", num_tokens, topk)
                if ids.max() >= num_experts:
                    i, j = np.argwhere(ids >= num_experts)[0]
                    raise TraceError(
                        f"{where}: field 'top_indices[{i}][{j}]' = {int(ids[i, j])} is not an expert "
                        f"id below --num-experts={num_experts}"
                    )
                tokens[s] = np.bincount(ids.ravel(), minlength=num_experts)
            if any(k != keys[0] for k in keys):
                bad = next(i for i, k in enumerate(keys) if k != keys[0])
                raise TraceError(
                    f"{row[bad][1]}: (step, layer) {keys[bad]} does not match {row[0][1]}'s {keys[0]} "
                    "(rank files must record the same steps and layers in the same order)"
                )
            step, layer = keys[0]
            mb = seen.get(keys[0], 0)
            seen[keys[0]] = mb + 1
            yield TraceRecord(step, mb, layer, tokens)

    return info, records()


def spread_over_sources(expert_load: np.ndarray, num_gpus: int) -> np.ndarray:
    """int [E] -> int64 [G, E]: each expert's tokens split evenly over sources, remainders rotated."""
    load = np.asarray(expert_load, dtype=np.int64)
    base, rem = np.divmod(load, num_gpus)
    rank = (np.arange(num_gpus)[:, None] - np.arange(len(load))[None, :]) % num_gpus
    return base[None, :] + (rank < rem[None, :])


def read_megatron_tokens_per_expert(
    folder: str | os.PathLike, ranks: list[int] | None = None
) -> tuple[TraceInfo, Iterator[TraceRecord]]:
    """``--save-tokens-per-expert-interval`` output (``{save}/tokens_per_expert/rank{r}.jsonl``): per line
    ``{"iter", "block", "layer", "tpe": [[tokens per local expert] per micro-batch]}``. Rank r's local
    experts follow rank r-1's, in rank order (all files, or ``ranks``)."""
    folder = Path(folder)
    if (folder / "tokens_per_expert").is_dir():
        folder = folder / "tokens_per_expert"
    files = _rank_files(folder, r"rank(\d+)\.jsonl", ranks)
    num_gpus = len(files)
    rows = _zip_rank_lines(files)
    try:
        first_row = next(rows)
    except StopIteration:
        raise TraceError(f"{folder}: empty trace (no records)") from None

    def parse(row):
        keys, blocks = [], []
        for _rank, where, obj in row:
            keys.append((_int_field(obj, "iter", where), _layer_id(obj, where)))
            if "tpe" not in obj:
                raise TraceError(f"{where}: missing field 'tpe'")
            blocks.append(_count_matrix(obj["tpe"], where, "tpe", None, None))
        if any(k != keys[0] for k in keys):
            bad = next(i for i, k in enumerate(keys) if k != keys[0])
            raise TraceError(f"{row[bad][1]}: (iter, layer) {keys[bad]} does not match {row[0][1]}'s {keys[0]}")
        mbs = {b.shape[0] for b in blocks}
        if len(mbs) != 1:
            raise TraceError(
                f"{row[0][1]}: ranks recorded different numbers of micro-batches ({sorted(mbs)}) in field 'tpe'"
            )
        return keys[0], np.concatenate(blocks, axis=1)

    (step0, layer0), loads0 = parse(first_row)
    num_experts = loads0.shape[1]
    info = TraceInfo(
        num_gpus,
        num_experts,
        "megatron-tokens-per-expert",
        f"{folder.parent.name}/{folder.name}/ (Megatron --save-tokens-per-expert-interval, ranks "
        f"{[r for r, _ in files]})",
        per_source_known=False,
    )

    def records() -> Iterator[TraceRecord]:
        step, layer, loads = step0, layer0, loads0
        while True:
            for mb, load in enumerate(loads):
                yield TraceRecord(step, mb, layer, spread_over_sources(load, num_gpus))
            row = next(rows, None)
            if row is None:
                return
            (step, layer), loads = parse(row)
            if loads.shape[1] != num_experts:
                raise TraceError(f"{row[0][1]}: ranks record {loads.shape[1]} experts in total, earlier {num_experts}")

    return info, records()


# --- generated workloads -----------------------------------------------------------------------------

GENERATOR_SHAPE_KEYS = {
    "gpus": 64,
    "experts": 256,
    "layers": 4,
    "micro_batches": 48,
    "micro_batches_per_step": 4,
    "tokens": 4096,
    "topk": 8,
    "seed": 0,
}


def parse_generator_spec(spec: str) -> tuple[str, dict, dict]:
    """``gen:NAME[:k=v,...]`` -> (workload name, shape, workload params). Shape keys and defaults:
    GENERATOR_SHAPE_KEYS; any other key is passed to the workload generator."""
    body = spec[len("gen:") :]
    name, _, rest = body.partition(":")
    if not name:
        raise TraceError(f"{spec!r}: expected gen:WORKLOAD[:key=value,...]")
    shape, params = dict(GENERATOR_SHAPE_KEYS), {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise TraceError(f"{spec!r}: {item!r} is not key=value")
        try:
            number = int(value)
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                number = value
        if key in shape:
            if not isinstance(number, int) or number < (0 if key == "seed" else 1):
                raise TraceError(
                    f"{spec!r}: {key} must be a {'non-negative' if key == 'seed' else 'positive'} "
                    f"integer, got {value!r}"
                )
            shape[key] = number
        else:
            params[key] = number
    return name, shape, params


def generate_trace(spec: str) -> tuple[TraceInfo, Iterator[TraceRecord]]:
    """A seeded workload, generated one layer at a time (memory: one layer's [M, G, E])."""
    from megatron_microep.planning import workloads

    name, shape, params = parse_generator_spec(spec)
    if name not in workloads.WORKLOADS:
        raise TraceError(f"{spec!r}: unknown workload {name!r}; known: {', '.join(sorted(workloads.WORKLOADS))}")
    args = (shape["micro_batches"], shape["gpus"], shape["experts"], shape["tokens"], shape["topk"])

    def layer_tokens(layer: int) -> np.ndarray:
        seed = int(np.random.SeedSequence([shape["seed"], layer]).generate_state(1)[0])
        try:
            return workloads.generate(name, *args, seed, **params)
        except TypeError as err:
            raise TraceError(f"{spec!r}: {err}") from None
        except ValueError as err:
            raise TraceError(f"{spec!r}: {err}") from None

    first = layer_tokens(0)  # fail on bad parameters before the replay starts
    info = TraceInfo(
        shape["gpus"],
        shape["experts"],
        "generated",
        f"generated {name} ({', '.join(f'{k}={v}' for k, v in {**shape, **params}.items())})",
        meta={"workload": name, **shape, **params},
    )

    def records() -> Iterator[TraceRecord]:
        per_step = shape["micro_batches_per_step"]
        for layer in range(shape["layers"]):
            tokens = first if layer == 0 else layer_tokens(layer)
            for m in range(shape["micro_batches"]):
                yield TraceRecord(m // per_step, m % per_step, layer, tokens[m])

    return info, records()


# --- dispatch ------------------------------------------------------------------------------------------


def open_trace(
    spec: str, num_experts: int | None = None, ranks: list[int] | None = None
) -> tuple[TraceInfo, Iterator[TraceRecord]]:
    """Open any supported trace; see the module doc for how ``spec`` is recognised.

    ``ranks`` selects the EP ranks of a Megatron trace directory, ``num_experts`` sets the expert
    count of a Megatron router trace; giving either for a trace that has no use for it is an error.
    """
    path = Path(spec)
    router_dir = path.is_dir() and any(path.glob("router_trace_rank*.jsonl"))
    if ranks is not None and not path.is_dir():
        raise TraceError(f"{spec}: --megatron-ranks applies only to a Megatron trace directory")
    if num_experts is not None and not router_dir:
        raise TraceError(f"{spec}: --num-experts applies only to a Megatron router trace directory")
    if spec.startswith("gen:"):
        return generate_trace(spec)
    if not path.exists():
        raise TraceError(f"{spec}: no such file or directory")
    if path.is_dir():
        if router_dir:
            return read_megatron_router_trace(path, num_experts, ranks)
        if any(path.glob("rank*.jsonl")) or (path / "tokens_per_expert").is_dir():
            return read_megatron_tokens_per_expert(path, ranks)
        raise TraceError(
            f"{spec}: directory holds neither router_trace_rank*.jsonl (--moe-routing-trace-path) "
            "nor tokens_per_expert/rank*.jsonl (--save-tokens-per-expert-interval)"
        )
    with open(path, "rb") as f:
        magic = f.read(len(NATIVE_MAGIC))
    if magic == NATIVE_MAGIC:
        return read_native(path)
    return read_jsonl(path)
