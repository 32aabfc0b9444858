"""Structured output: constrain generation to a JSON schema.

    python examples/structured_output.py                            # a tiny random model, offline, CPU
    python examples/structured_output.py --model openai/gpt-oss-20b

Two ways, both through SamplingParams(json_schema=...):
  1. LLM.generate: the completion is the JSON itself (then the model's end token);
  2. LLM.chat: the model may reason first; the final answer (.content) is the JSON.
The server takes the same schema as OpenAI's response_format={"type": "json_schema", ...}
(docs/structured_output.md). xgrammar masks every token that would break the schema, so the
output parses even from the tiny random model; bounded strings and numbers (maxLength, enum,
minimum/maximum) keep it short enough to finish within max_tokens.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# offline: point openai-harmony at the vocabulary next to the repo, as tests/conftest.py does
_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizer"
if "TIKTOKEN_ENCODINGS_BASE" not in os.environ and _TOKENIZER.is_dir():
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(_TOKENIZER)

from gptoss import SamplingParams  # noqa: E402
from gptoss.testing import llm_or_tiny  # noqa: E402

CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 50},
        "climate": {"type": "string", "enum": ["oceanic", "continental", "mediterranean", "tropical"]},
    },
    "required": ["name", "country", "population_millions", "climate"],
    "additionalProperties": False,
}


def check(text: str) -> dict:
    """Parse the JSON and check what the schema promised (the grammar guarantees it)."""
    obj = json.loads(text)
    assert set(obj) == set(CITY["required"]), obj
    assert 0 <= obj["population_millions"] <= 50 and obj["climate"] in CITY["properties"]["climate"]["enum"], obj
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="JSON-schema constrained generation and chat.")
    p.add_argument("--model", default=None,
                   help="hub repo id or local checkpoint directory (default: a tiny random checkpoint)")
    p.add_argument("--max-tokens", type=int, default=96, help="most tokens per answer")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (a reproducible run)")
    a = p.parse_args(argv)

    with llm_or_tiny(a.model) as llm:
        # 1. plain generation: the output is the JSON document
        sp = SamplingParams(temperature=1.0, max_tokens=a.max_tokens, seed=a.seed, json_schema=CITY)
        out = llm.generate("A JSON description of Paris:", sp, use_tqdm=False)[0].outputs[0]
        print(f"[GENERATE] {out.text}")
        print(f"[GENERATE PARSED] {check(out.text)} (finish_reason={out.finish_reason})")

        # 2. chat: reasoning first (capped by reasoning_budget tokens), then the JSON as the final answer
        sp = SamplingParams(temperature=1.0, max_tokens=a.max_tokens, seed=a.seed, json_schema=CITY,
                            reasoning_budget=a.max_tokens // 4)
        reply = llm.chat([{"role": "user", "content": "Describe Paris as JSON."}], sp, reasoning_effort="low")[0]
        print(f"[CHAT REASONING] {reply.reasoning}")
        print(f"[CHAT CONTENT] {reply.content}")
        print(f"[CHAT PARSED] {check(reply.content)} (finish_reason={reply.finish_reason})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
