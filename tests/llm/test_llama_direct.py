"""Talks to llama-server directly (no proxy) to prove the fixture yields a working real server."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.llm


async def test_chat_reports_real_usage(llama_server: str, llama_model_name: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{llama_server}/v1", api_key="unused") as client:
        resp = await client.chat.completions.create(
            model=llama_model_name,
            messages=[{"role": "user", "content": "Say hello in one short sentence."}],
            max_tokens=8,
            temperature=0,
            seed=1,
            # llama.cpp extension: never stop early, so max_tokens is exactly what is generated.
            extra_body={"ignore_eos": True},
        )
    assert resp.object == "chat.completion"
    assert resp.model == llama_model_name
    assert resp.choices[0].message.content
    usage = resp.usage
    assert usage is not None
    # The chat template alone adds tokens beyond the 7-word prompt.
    assert usage.prompt_tokens > 7
    assert usage.completion_tokens == 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert resp.choices[0].finish_reason == "length"
