"""The embedded run's corpus and sampler: deterministic file choice, a tokenizer that round-trips the
source, and a sample order that covers the data once per epoch and depends only on (step, micro, rank)."""

import os
import random

import numpy as np
import pytest

from megatron_microep.glue.data import (
    CorpusError,
    Sampler,
    prepare_corpus,
    select_files,
    stdlib_files,
    stdlib_root,
    validation_batches,
)


@pytest.fixture(scope="module")
def seed():
    value = int(os.environ.get("MICROEP_TEST_SEED", random.randrange(2**31)))
    print(f"seed {value}")
    return value


def _fake_stdlib(root, rng):
    for i in range(40):
        sub = root / f"pkg{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        body = "\n".join(
            f"def f{i}_{j}(x):\n    return x * {rng.randint(0, 99)}  # é\n" for j in range(rng.randint(5, 40))
        )
        (sub / f"mod{i}.py").write_text(body, encoding="utf-8")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third_party.py").write_text("x = 1\n")
    return root


def test_stdlib_is_found_without_third_party_packages():
    files = stdlib_files()
    assert len(files) > 100
    assert not any("site-packages" in p.parts for p in files)
    assert (stdlib_root() / "os.py") in files


def test_file_selection_is_deterministic_and_split(tmp_path, seed):
    root = _fake_stdlib(tmp_path / "lib", random.Random(seed))
    files = stdlib_files(root)
    assert len(files) == 40
    train, valid = select_files(files, root, 0.02, 0.2, seed)
    again = select_files(list(reversed(files)), root, 0.02, 0.2, seed)
    assert (train, valid) == again
    assert not set(train) & set(valid) and valid
    assert sum(p.stat().st_size for p in train + valid) >= 0.02e6 or len(train) + len(valid) == 40


def test_corpus_tokenizes_and_round_trips(tmp_path, seed):
    from tokenizers import Tokenizer

    root = _fake_stdlib(tmp_path / "lib", random.Random(seed))
    corpus = prepare_corpus(tmp_path / "cache", 1.0, 300, 0.2, seed, root=root, log=lambda _: None)
    assert corpus.meta["train_files"] + corpus.meta["valid_files"] == 40
    assert corpus.train.max() < corpus.vocab_size and corpus.eod == 0
    assert int((np.asarray(corpus.train) == corpus.eod).sum()) == corpus.meta["train_files"]
    tokenizer = Tokenizer.from_file(str(corpus.tokenizer_path))
    text = (root / "pkg1" / "mod1.py").read_text(encoding="utf-8")
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    cached = prepare_corpus(tmp_path / "cache", 1.0, 300, 0.2, seed, root=root, log=pytest.fail)
    assert np.array_equal(cached.train, corpus.train)


def test_sampler_epochs_and_resumability(seed):
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, 1000, size=8 * 37 + 1, dtype=np.int32)  # 37 samples of 8 tokens
    dp, mbs, gbs = 2, 3, 12
    sampler = Sampler(stream, 8, mbs, gbs, dp, seed)
    micro_per_step = gbs // (mbs * dp)
    starts = []
    for step in range(6):
        for micro in range(micro_per_step):
            for rank in range(dp):
                tokens, labels = sampler.micro_batch(step, micro, rank)
                assert tokens.shape == labels.shape == (mbs, 8)
                assert np.array_equal(tokens[:, 1:], labels[:, :-1])
                starts += [int(np.flatnonzero((stream[:-1].reshape(-1, 8) == row).all(axis=1))[0]) for row in tokens]
    # Positions 0..36 are epoch 0: every sample exactly once; then epoch 1 starts over.
    assert sorted(starts[:37]) == list(range(37))
    assert sorted(starts[37:72]) == sorted(set(starts[37:72]))
    # A fresh sampler (a resumed run) returns the same batch for the same (step, micro, rank).
    fresh = Sampler(stream, 8, mbs, gbs, dp, seed)
    assert np.array_equal(fresh.micro_batch(4, 1, 1)[0], sampler.micro_batch(4, 1, 1)[0])
    with pytest.raises(CorpusError, match="fewer than one global batch"):
        Sampler(stream, 8, mbs, 48, dp, seed)


def test_validation_batches_are_disjoint_across_ranks(seed):
    stream = np.arange(8 * 20 + 1, dtype=np.int32)
    a = validation_batches(stream, 8, 2, 2, 0, 2)
    b = validation_batches(stream, 8, 2, 2, 1, 2)
    rows = {int(t[0]) for batch in a + b for t in batch[0]}
    assert len(rows) == 8
    with pytest.raises(CorpusError, match="validation split holds 20 samples, 24 needed"):
        validation_batches(stream, 8, 2, 3, 0, 4)
