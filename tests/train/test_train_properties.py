"""Property tests of the small pieces the trainer relies on: subsets, sample stream, token table."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemoe.train.data import _stratified_indices
from edgemoe.train.tokens import DONE, DROPPED, TokenTable
from edgemoe.train.trainer import SampleStream


@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=80),
    limit=st.integers(1, 100),
    seed=st.integers(0, 3),
)
def test_stratified_subset_is_balanced(labels, limit, seed):
    y = np.array(labels)
    idx = _stratified_indices(y, limit, seed)
    assert len(idx) == min(limit, len(y)) and (np.diff(idx) > 0).all()
    counts = np.bincount(y[idx], minlength=5)
    available = np.bincount(y, minlength=5)
    # round robin over classes: no class holds more than one sample above any class that still
    # had samples left
    short = counts < available
    if short.any():
        assert counts.max() <= counts[short].min() + 1


@given(n=st.integers(1, 30), takes=st.lists(st.integers(0, 50), max_size=8), seed=st.integers(0, 5))
def test_sample_stream_is_a_sequence_of_permutations(n, takes, seed):
    stream = SampleStream(n, np.random.SeedSequence(seed))
    drawn = np.concatenate([stream.next(k) for k in takes] + [np.empty(0, np.int64)])
    full = len(drawn) // n
    for e in range(full):
        assert sorted(drawn[e * n : (e + 1) * n]) == list(range(n))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_token_table_pops_each_token_exactly_once(data):
    k, servers, dim = 2, 4, 3
    table = TokenTable(k, dim)
    rng = np.random.default_rng(data.draw(st.integers(0, 100)))
    popped, next_id = [], 0
    for _ in range(data.draw(st.integers(1, 6))):
        n = int(rng.integers(0, 6))
        experts = np.argsort(rng.random((n, servers)), axis=1)[:, :k]
        kept = rng.random((n, k)) > 0.2
        table.add(np.arange(next_id, next_id + n), np.arange(n), 0, torch.randn(n, dim), experts, kept)
        next_id += n
        for j in range(servers):
            rows, _ = table.queued_on(j)
            ids = table.ids_P[rows]
            take = ids[rng.random(len(ids)) < 0.5]
            if rng.random() < 0.3:
                table.drop(j, take)
            else:
                table.deliver(j, take, torch.ones(len(take), dim))
        out = table.pop_completed()
        # a popped token's outputs are exactly those delivered (ones), zeros where dropped
        expected = torch.from_numpy(out.kept_NK).float().unsqueeze(-1).expand(-1, -1, dim)
        assert torch.equal(out.y_NKD, expected)
        popped.extend(out.ids_N.tolist())
    assert len(popped) == len(set(popped))
    assert sorted(popped + table.ids_P.tolist()) == list(range(next_id))
    # whatever is still in the table has an assignment queued; popped tokens had none
    assert (table.status_PK == 0).any(axis=1).all()
    assert set(np.unique(table.status_PK)) <= {0, DONE, DROPPED}
