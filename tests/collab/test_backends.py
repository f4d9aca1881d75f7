"""Expert backends: option-letter scoring from logits/logprobs, text fallback, errors, config."""

from __future__ import annotations

import asyncio
import math
import socket

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgemoe.collab.backends import (
    BackendError,
    LlamaCppConfig,
    Message,
    OpenAIConfig,
    TinyConfig,
    build_backend,
)
from edgemoe.collab.backends.base import letter_from_text, smoothed_one_hot
from edgemoe.collab.backends.local import letter_token_ids, letters_from_logits
from edgemoe.collab.backends.openai_http import first_token_top_logprobs, letters_from_top
from edgemoe.collab.prompts import mc_prompt
from edgemoe.config import ConfigError
from edgemoe.testing import TinyOpenAIServer

PROMPT = mc_prompt(
    "Which gas do plants absorb?", ["Oxygen", "Nitrogen", "Carbon dioxide", "Helium"], "biology"
)


@pytest.fixture(scope="module")
def server():
    with TinyOpenAIServer(3) as srv:
        yield srv


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_http_logprobs_equal_the_local_letter_softmax(server, endpoint):
    """With the full vocabulary in the top logprobs, HTTP scoring equals the model's own letter softmax."""
    remote = build_backend("r", OpenAIConfig(url=server.url, mc_endpoint=endpoint, top_logprobs=100))
    try:
        scores = remote.score_choices(PROMPT, 4)
    finally:
        remote.close()
    prompt = PROMPT if endpoint == "completions" else f"user: {PROMPT}\nassistant:"
    expected = server.model.letter_logprobs(prompt, 4)
    assert scores.source == "logprobs"
    np.testing.assert_allclose(scores.logprobs, expected, atol=1e-5)
    assert scores.prompt_tokens == len(prompt) and scores.latency_s > 0


def test_local_tiny_backend_matches_the_served_model(server):
    local = build_backend("l", TinyConfig(seed=3))
    np.testing.assert_allclose(
        local.score_choices(PROMPT, 4).logprobs, server.model.letter_logprobs(PROMPT, 4)
    )


def test_async_path_equals_sync_path(server):
    backend = build_backend("r", OpenAIConfig(url=server.url + "/v1"))

    async def both():
        try:
            return await asyncio.gather(
                backend.ascore_choices(PROMPT, 4), backend.agenerate([Message("user", "hi")], 5)
            )
        finally:
            await backend.aclose()

    scores, gen = asyncio.run(both())
    sync = build_backend("s", OpenAIConfig(url=server.url))
    try:
        assert scores.logprobs == sync.score_choices(PROMPT, 4).logprobs
        assert gen.text == sync.generate([Message("user", "hi")], 5).text and gen.completion_tokens == 5
    finally:
        sync.close()


def test_endpoint_without_logprobs_falls_back_to_the_written_letter():
    with TinyOpenAIServer(0, offer_logprobs=False, letter_bias={"C": 20.0}) as srv:
        backend = build_backend("t", OpenAIConfig(url=srv.url))
        scores = backend.score_choices(PROMPT, 4)
        backend.close()
    assert scores.source == "text" and scores.answer == 2
    assert scores.probs.sum() == pytest.approx(1.0) and scores.probs[2] == pytest.approx(0.95)


def test_unreachable_endpoint_raises_backend_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again on exit: nothing listens there
    backend = build_backend("gone", OpenAIConfig(url=f"http://127.0.0.1:{port}", timeout_s=2))
    with pytest.raises(BackendError, match="gone"):
        backend.score_choices(PROMPT, 4)


@given(
    st.dictionaries(
        st.sampled_from(["A", " A", "B", " B", "C", "D", "x", " the"]), st.floats(-30, 0), min_size=1
    ),
    st.integers(2, 4),
)
def test_letters_from_top_is_a_distribution_that_keeps_the_order(top, n):
    logprobs = letters_from_top(top, "ABCD"[:n])
    assert math.isclose(sum(math.exp(v) for v in logprobs), 1.0, rel_tol=1e-9)
    mass = [sum(math.exp(v) for t, v in top.items() if t.strip() == letter) for letter in "ABCD"[:n]]
    for i in range(n):
        for j in range(n):
            if mass[i] > 0 and mass[j] > 0 and mass[i] > mass[j] * (1 + 1e-9):
                assert logprobs[i] > logprobs[j]
            if mass[i] > 0 and mass[j] == 0:
                assert logprobs[i] > logprobs[j]


def test_both_logprobs_layouts_parse():
    legacy = {"logprobs": {"top_logprobs": [{" A": -0.1, " B": -2.5}]}}
    chat = {"logprobs": {"content": [{"token": "A", "top_logprobs": [{"token": "A", "logprob": -0.1}]}]}}
    assert first_token_top_logprobs(legacy) == {" A": -0.1, " B": -2.5}
    assert first_token_top_logprobs(chat) == {"A": -0.1}
    assert first_token_top_logprobs({"logprobs": None}) is None


def test_logit_scoring_sums_letter_spellings():
    logits = np.array([0.0, 2.0, 1.0, 5.0, -1.0])
    ids = [[1, 2], [3], [4]]  # "A" has two spellings
    expected = np.log(np.array([np.exp(2.0) + np.exp(1.0), np.exp(5.0), np.exp(-1.0)]))
    expected -= np.log(np.exp(expected).sum())
    np.testing.assert_allclose(letters_from_logits(logits, ids), expected)
    vocab = {"A": [7], " A": [8], "B": [9], " B": [3, 4]}
    assert letter_token_ids(lambda t: vocab[t], "AB") == [[7, 8], [9]]
    with pytest.raises(BackendError, match="'C'"):
        letter_token_ids(lambda t: vocab.get(t, [1, 2]), "ABC")


def test_text_helpers():
    assert letter_from_text(" (B) because", "ABCD") == 1
    assert letter_from_text("Answer", "ABCD") is None
    assert letter_from_text("d.", "ABCD") == 3
    assert np.exp(smoothed_one_hot(None, 4)) == pytest.approx(np.full(4, 0.25))


def test_backend_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="url"):
        OpenAIConfig()
    with pytest.raises(ConfigError, match="path"):
        LlamaCppConfig()
    with pytest.raises(ConfigError, match="timeout_s"):
        TinyConfig(timeout_s=0)
    with pytest.raises(ConfigError, match="api_key_env"):
        build_backend("x", OpenAIConfig(url="http://127.0.0.1:1", api_key_env="EDGEMOE_UNSET_KEY_VAR"))
    with pytest.raises(ConfigError, match="package"):
        build_backend("x", LlamaCppConfig(package="edgemoe_no_such_model_package"))
