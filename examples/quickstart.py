"""gptoss in a dozen lines: complete a prompt, then chat (reasoning and answer come apart).

    python examples/quickstart.py --model openai/gpt-oss-20b
    gptoss make-checkpoint /tmp/gptoss-tiny --preset tiny && python examples/quickstart.py --model /tmp/gptoss-tiny
"""

import argparse

from gptoss import LLM, SamplingParams


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Generate and chat with a gpt-oss checkpoint.")
    p.add_argument("--model", default="openai/gpt-oss-20b", help="hub repo id or local checkpoint directory")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer")
    a = p.parse_args(argv)

    llm = LLM(a.model)

    # plain completion
    outs = llm.generate(["The capital of France is", "1 + 1 ="], SamplingParams(temperature=0, max_tokens=16))
    for out in outs:
        print(f"[PROMPT] {out.prompt!r}\n[OUTPUT] {out.outputs[0].text!r}")

    # chat: the harmony format is rendered and parsed for you
    reply = llm.chat([{"role": "user", "content": "Explain MXFP4 in one sentence."}],
                     SamplingParams(temperature=1.0, max_tokens=a.max_tokens), reasoning_effort="low")[0]
    print(f"[REASONING] {reply.reasoning}\n[ANSWER] {reply.content}\n[FINISH] {reply.finish_reason}")


if __name__ == "__main__":
    main()
