"""gptoss in a few lines: complete prompts, stream tokens, then chat (reasoning and answer come apart).

    python examples/quickstart.py                                   # a tiny random model, offline, CPU
    python examples/quickstart.py --model openai/gpt-oss-20b        # or any local checkpoint directory

Without --model the example writes a tiny random checkpoint to a temporary directory, so it runs
anywhere in a few seconds; its text is random tokens, but every step below is the real one.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# offline: point openai-harmony at the vocabulary next to the repo, as tests/conftest.py does
_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizer"
if "TIKTOKEN_ENCODINGS_BASE" not in os.environ and _TOKENIZER.is_dir():
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(_TOKENIZER)

from gptoss import SamplingParams  # noqa: E402
from gptoss.testing import llm_or_tiny  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Generate, stream and chat with a gpt-oss checkpoint.")
    p.add_argument("--model", default=None,
                   help="hub repo id or local checkpoint directory (default: a tiny random checkpoint)")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens per chat answer")
    a = p.parse_args(argv)

    with llm_or_tiny(a.model) as llm:
        # plain completion: one RequestOutput per prompt, in order
        outs = llm.generate(["The capital of France is", "1 + 1 ="], SamplingParams(temperature=0, max_tokens=16),
                            use_tqdm=False)
        for out in outs:
            print(f"[PROMPT] {out.prompt!r}\n[OUTPUT] {out.outputs[0].text!r}")

        # streaming: generate_stream yields the request's output after every new token
        print("[STREAM] ", end="")
        seen = 0
        for out in llm.generate_stream("Once upon a time", SamplingParams(temperature=0, max_tokens=12)):
            text = out.outputs[0].text
            print(text[seen:], end="", flush=True)
            seen = len(text)
        print(f"\n[STREAM FINISH] {out.outputs[0].finish_reason}")

        # chat: the harmony format is rendered and parsed for you
        reply = llm.chat([{"role": "user", "content": "Explain MXFP4 in one sentence."}],
                         SamplingParams(temperature=1.0, max_tokens=a.max_tokens, seed=0), reasoning_effort="low")[0]
        print(f"[REASONING] {reply.reasoning}\n[ANSWER] {reply.content}\n[FINISH] {reply.finish_reason}")


if __name__ == "__main__":
    main()
