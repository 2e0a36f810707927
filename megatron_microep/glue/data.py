"""Training text for the embedded CPU run: this interpreter's standard-library source, tokenized with a
byte-level BPE trained on it (Hugging Face ``tokenizers``; nothing is downloaded).

Files are picked in a seeded hash order until the size budget is reached, so a budget gives the same
files on every run of one Python installation; files are split into training and validation by the
same hash. Documents are joined with an end-of-text token into one token stream per split. Samples
are the non-overlapping windows of ``seq_length + 1`` tokens, visited in a seeded permutation per
epoch; which samples a rank reads depends only on (step, micro-batch, data-parallel rank), so a
resumed run reads exactly what an uninterrupted one would have read.

The prepared corpus is cached under ``cache_dir`` by a key of everything that shapes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

END_OF_TEXT = "<|endoftext|>"
FORMAT_VERSION = 1


class CorpusError(RuntimeError):
    """The corpus cannot be built (no source files, tokenizers missing, too little text)."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every ``.py`` file of the standard library (installed third-party packages excluded), sorted."""
    root = root or stdlib_root()
    return sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file()
    )


def _rank_key(relative: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}:{relative}".encode()).digest()


def select_files(
    files: list[Path], root: Path, megabytes: float, validation_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """(train, validation) files: the first files in seeded hash order whose sizes add up to ``megabytes``."""
    ordered = sorted(files, key=lambda p: _rank_key(str(p.relative_to(root)), seed))
    budget, total, picked = megabytes * 1e6, 0, []
    for path in ordered:
        if total >= budget:
            break
        picked.append(path)
        total += path.stat().st_size
    valid_key = {p: _rank_key(str(p.relative_to(root)), seed + 1) for p in picked}
    valid = [p for p in picked if valid_key[p][0] < 256 * validation_fraction]
    if not valid and len(picked) > 1 and validation_fraction > 0:
        # A small selection can draw no validation file by chance; evaluation needs one.
        valid = [min(picked, key=valid_key.__getitem__)]
    held = set(valid)
    return [p for p in picked if p not in held], valid


@dataclass(frozen=True)
class Corpus:
    directory: Path
    train: np.ndarray  # int32 [tokens]: training documents joined by end-of-text
    valid: np.ndarray  # int32 [tokens]
    vocab_size: int
    eod: int
    meta: dict

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tokenizer.json"


def _train_tokenizer(texts: list[str], vocab_size: int):
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise CorpusError("the embedded run needs the 'tokenizers' package (pip install tokenizers)") from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _stream(tokenizer, texts: list[str], eod: int) -> np.ndarray:
    pieces = []
    for encoding in tokenizer.encode_batch(texts):
        pieces.append(np.asarray(encoding.ids, dtype=np.int32))
        pieces.append(np.asarray([eod], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def corpus_key(files: list[Path], root: Path, vocab_size: int, validation_fraction: float, seed: int) -> str:
    digest = hashlib.sha256(f"v{FORMAT_VERSION}:{vocab_size}:{validation_fraction}:{seed}".encode())
    for path in files:
        digest.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def prepare_corpus(
    cache_dir: str | os.PathLike,
    megabytes: float,
    vocab_size: int,
    validation_fraction: float,
    seed: int,
    root: Path | None = None,
    log=print,
) -> Corpus:
    """Build (or load from ``cache_dir``) the tokenized standard-library corpus; see the module docstring."""
    root = root or stdlib_root()
    files = stdlib_files(root)
    if not files:
        raise CorpusError(f"no .py files under {root}: cannot build the standard-library corpus")
    train_files, valid_files = select_files(files, root, megabytes, validation_fraction, seed)
    key = corpus_key(train_files + valid_files, root, vocab_size, validation_fraction, seed)
    directory = Path(cache_dir) / f"pystdlib-{key}"
    if not (directory / "meta.json").exists():
        started = time.perf_counter()
        train_texts = [_read(p) for p in train_files]
        valid_texts = [_read(p) for p in valid_files]
        tokenizer = _train_tokenizer(train_texts, vocab_size)
        eod = tokenizer.token_to_id(END_OF_TEXT)
        train, valid = _stream(tokenizer, train_texts, eod), _stream(tokenizer, valid_texts, eod)
        meta = {
            "format": FORMAT_VERSION,
            "key": key,
            "source": str(root),
            "train_files": len(train_files),
            "valid_files": len(valid_files),
            "bytes": sum(p.stat().st_size for p in train_files + valid_files),
            "vocab_size": tokenizer.get_vocab_size(),
            "eod": eod,
            "train_tokens": int(train.size),
            "valid_tokens": int(valid.size),
            "seed": seed,
        }
        tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(tmp / "tokenizer.json"))
        np.save(tmp / "train.npy", train)
        np.save(tmp / "valid.npy", valid)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(directory)
        except OSError:  # another process finished the same corpus first
            if not (directory / "meta.json").exists():
                raise
        log(
            f"corpus: {meta['train_files']} + {meta['valid_files']} standard-library files "
            f"({meta['bytes'] / 1e6:.1f} MB) -> {meta['train_tokens']} + {meta['valid_tokens']} tokens, "
            f"BPE vocabulary {meta['vocab_size']}, in {time.perf_counter() - started:.1f} s"
        )
    return load_corpus(directory)


def load_corpus(directory: str | os.PathLike) -> Corpus:
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    train = np.load(directory / "train.npy", mmap_mode="r")
    valid = np.load(directory / "valid.npy", mmap_mode="r")
    return Corpus(directory, train, valid, meta["vocab_size"], meta["eod"], meta)


class Sampler:
    """Seeded, resumable sample order over a token stream.

    ``micro_batch(step, micro, rank)`` -> (tokens, labels) int64 [micro_batch_size, seq_length].
    Global batch ``step`` covers the samples ``step * global_batch_size ...`` of an endless sequence of
    per-epoch permutations; micro-batch ``m`` of data-parallel rank ``r`` takes positions
    ``(m * dp + r) * micro_batch_size ...`` of it.
    """

    def __init__(
        self,
        stream: np.ndarray,
        seq_length: int,
        micro_batch_size: int,
        global_batch_size: int,
        dp_size: int,
        seed: int,
    ):
        self.stream, self.seq_length = stream, seq_length
        self.micro_batch_size, self.global_batch_size, self.dp_size = micro_batch_size, global_batch_size, dp_size
        self.num_samples = (len(stream) - 1) // seq_length
        if self.num_samples < global_batch_size:
            raise CorpusError(
                f"the corpus holds {self.num_samples} samples of {seq_length} tokens, fewer than "
                f"one global batch ({global_batch_size}); raise embedded.corpus_megabytes"
            )
        self.seed = seed
        self._epoch, self._perm = -1, None

    def _sample_id(self, position: int) -> int:
        epoch, index = divmod(position, self.num_samples)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return int(self._perm[index])

    def window(self, sample: int) -> np.ndarray:
        start = sample * self.seq_length
        return np.asarray(self.stream[start : start + self.seq_length + 1], dtype=np.int64)

    def micro_batch(self, step: int, micro: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
        first = step * self.global_batch_size + (micro * self.dp_size + rank) * self.micro_batch_size
        rows = np.stack([self.window(self._sample_id(first + i)) for i in range(self.micro_batch_size)])
        return rows[:, :-1], rows[:, 1:]


def validation_batches(
    stream: np.ndarray, seq_length: int, micro_batch_size: int, count: int, rank: int, dp_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` fixed micro-batches of the validation stream for ``rank`` (the same at every evaluation)."""
    samples = (len(stream) - 1) // seq_length
    needed = count * micro_batch_size * dp_size
    if samples < needed:
        raise CorpusError(
            f"the validation split holds {samples} samples, {needed} needed "
            "(training.eval_iters x micro_batch_size x data-parallel ranks); raise "
            "embedded.validation_fraction or embedded.corpus_megabytes"
        )
    out = []
    for m in range(count):
        first = (m * dp_size + rank) * micro_batch_size
        rows = np.stack(
            [
                np.asarray(stream[s * seq_length : s * seq_length + seq_length + 1], dtype=np.int64)
                for s in range(first, first + micro_batch_size)
            ]
        )
        out.append((rows[:, :-1], rows[:, 1:]))
    return out
