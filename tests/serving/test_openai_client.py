"""The gateway as a drop-in OpenAI endpoint: the official ``openai`` client and LangChain against a
loopback gateway over loopback expert servers."""

from __future__ import annotations

import json

import openai
import pytest

from edgemoe.serving.config import load_gateway_config
from edgemoe.serving.launcher import start_in_thread
from edgemoe.testing import TinyOpenAIServer

HELLO = [{"role": "user", "content": "Say hello"}]


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10)


def test_chat_and_stream_with_the_official_client(pair):
    client = client_for(pair.url)
    out = client.chat.completions.create(model="edgemoe-moe2", messages=HELLO, max_tokens=5)
    assert out.object == "chat.completion" and len(out.choices[0].message.content) == 5
    chunks = list(
        client.chat.completions.create(
            model="edgemoe-moe2",
            messages=HELLO,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == out.choices[0].message.content and finish == ["length"]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens >= 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert last.model_extra["moe2"]["answered_by"] == "alpha"
    # Without include_usage no chunk carries usage.
    plain = list(client.chat.completions.create(model="m", messages=HELLO, max_tokens=3, stream=True))
    assert all(c.usage is None for c in plain)


def test_every_pass_through_field_reaches_the_expert(make_gateway):
    run = make_gateway({"solo": TinyOpenAIServer(4)})
    fields = {
        "stop": ["zz"],
        "top_p": 0.5,
        "seed": 7,
        "frequency_penalty": 0.25,
        "presence_penalty": -0.5,
        "logit_bias": {"42": 1.5},
        "logprobs": True,
        "top_logprobs": 3,
        "user": "u-1",
        "n": 2,
        "parallel_tool_calls": False,
    }
    out = client_for(run.url).chat.completions.create(model="m", messages=HELLO, max_tokens=4, **fields)
    _, headers, body = run.servers["solo"].requests[-1]
    assert {k: body[k] for k in fields} == fields
    assert len(out.choices) == 2 and len(out.choices[0].logprobs.content[0].top_logprobs) == 3
    assert headers["x-request-id"]


def test_tool_calls_and_json_mode_round_trip(pair):
    client = client_for(pair.url)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(model="m", messages=HELLO, tools=tools, tool_choice=forced)
    call = out.choices[0].message.tool_calls[0]
    assert out.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    stream = client.chat.completions.create(
        model="m", messages=HELLO, tools=tools, tool_choice=forced, stream=True
    )
    calls = [tc for c in stream if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [tc.function.name for tc in calls] == ["get_weather"]
    out = client.chat.completions.create(model="m", messages=HELLO, response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_unknown_and_unhonourable_fields_are_400s_naming_them(pair):
    client = client_for(pair.url)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=HELLO, extra_body={"colour": "blue"})
    assert err.value.body["param"] == "colour"
    # An in-process tiny expert honours seed and stop only; a remote one honours everything.
    config = load_gateway_config(
        {
            "experts": [
                {"name": "local", "backend": {"kind": "tiny", "seed": 1}},
                {"name": "remote", "backend": {"kind": "openai", "url": pair.servers["alpha"].url}},
            ]
        }
    )
    run = start_in_thread(config)
    try:
        client = client_for(run.url)
        routed = client.chat.completions.create(model="m", messages=HELLO, max_tokens=2, top_p=0.5)
        assert [e["name"] for e in routed.model_extra["moe2"]["experts"]] == ["remote"]
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="local", messages=HELLO, max_tokens=2, top_p=0.5)
        assert err.value.body["param"] == "top_p" and err.value.body["code"] == "unsupported_parameter"
        both = client.chat.completions.create(model="m", messages=HELLO, max_tokens=2, seed=3)
        assert len(both.model_extra["moe2"]["experts"]) == 2
    finally:
        run.stop()


def test_models_list_and_addressing_one_expert(pair):
    client = client_for(pair.url)
    assert [m.id for m in client.models.list()] == ["edgemoe-moe2", "alpha", "beta"]
    assert client.models.retrieve("beta").id == "beta"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-5")
    assert err.value.body["code"] == "model_not_found"
    out = client.chat.completions.create(model="beta", messages=HELLO, max_tokens=3)
    block = out.model_extra["moe2"]
    assert out.model == "beta" and [e["name"] for e in block["experts"]] == ["beta"]
    assert block["answered_by"] == "beta"


def test_langchain_invoke_and_stream(pair):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        base_url=pair.url + "/v1",
        api_key="unused",
        model="edgemoe-moe2",
        max_tokens=4,
        max_retries=0,
        temperature=0,
    )
    reply = llm.invoke("Say hello")
    assert len(reply.content) == 4
    streamed = "".join(chunk.content for chunk in llm.stream("Say hello"))
    assert streamed == reply.content
