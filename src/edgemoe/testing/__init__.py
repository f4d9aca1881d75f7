"""Test doubles that are real: expert servers on loopback sockets, for tests, benchmarks and demos."""

from edgemoe.testing.fake_openai import TinyOpenAIServer

__all__ = ["TinyOpenAIServer"]
