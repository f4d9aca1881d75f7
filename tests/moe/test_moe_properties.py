"""Hypothesis properties of token-choice routing."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemoe.moe import RouterConfig


@settings(max_examples=60, deadline=None)
@given(
    num_tokens=st.integers(1, 40),
    num_experts=st.integers(1, 9),
    k_frac=st.floats(0.0, 1.0),
    cf=st.sampled_from([0.0, 0.5, 1.0, 1.25, -0.5, -1.0]),
    score_func=st.sampled_from(["softmax", "sigmoid"]),
    priority=st.sampled_from(["position", "score"]),
    renormalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_token_choice_routing_properties(
    num_tokens, num_experts, k_frac, cf, score_func, priority, renormalize, seed
):
    top_k = 1 + int(k_frac * (num_experts - 1))
    cfg = RouterConfig(
        top_k=top_k,
        capacity_factor=cf,
        score_func=score_func,
        drop_priority=priority,
        renormalize=renormalize,
    )
    torch.manual_seed(seed)
    router = cfg.build(dim=5, num_experts=num_experts)
    routing = router(torch.randn(num_tokens, 5) * 3)

    ids, kept, w = routing.expert_ids_TK, routing.kept_TK, routing.weights_TK
    assert ids.shape == (num_tokens, top_k)
    assert int(ids.min()) >= 0 and int(ids.max()) < num_experts
    # Every token at most k experts, and distinct ones.
    assert int(kept.sum(-1).max()) <= top_k
    assert all(len(set(row)) == top_k for row in ids.tolist())
    # Combine weights: non-negative, zero off the kept slots.
    assert bool((w >= 0).all())
    assert not w[~kept].any()
    has_kept = kept.any(-1)
    if renormalize:
        torch.testing.assert_close(w.sum(-1)[has_kept], torch.ones(int(has_kept.sum())))
    else:
        torch.testing.assert_close(w[kept], routing.scores_TE.gather(1, ids)[kept])
    # Capacity holds and telemetry adds up.
    loads = routing.stats.tokens_per_expert_E
    if routing.capacity is not None:
        assert int(loads.max()) <= routing.capacity
    if cf == 0:
        assert bool(kept.all())
    assert int(loads.sum()) == int(kept.sum())
    assert int(routing.stats.kept + routing.stats.dropped) == num_tokens * top_k
