"""LLM: the offline front end (generate / chat), a thin layer over the engine."""

from __future__ import annotations

import time
from typing import Iterator

from .config import EngineConfig
from .engine.llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .tokenizer import encode


class LLM:
    """gpt-oss on one device.

        llm = LLM("openai/gpt-oss-20b")                     # or a local checkpoint directory
        out = llm.generate("The capital of France is", SamplingParams(max_tokens=8))
        print(out[0].outputs[0].text)
    """

    def __init__(self, model: str, **kwargs):
        progress = kwargs.pop("progress", True)
        unknown = sorted(set(kwargs) - set(EngineConfig.field_names()))
        if unknown:
            raise TypeError(f"LLM() got unknown argument(s) {unknown}; allowed: {EngineConfig.field_names()[1:]}")
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = LLMEngine(self.config, progress=progress)

    @property
    def model_config(self):
        return self.engine.model_config

    # --- prompts ---------------------------------------------------------------------------------
    @staticmethod
    def _normalize(prompts) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str, a {{'prompt_token_ids': [...]}} dict, or a list of "
                            f"them; got {type(prompts).__name__}")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                out.append((p, encode(p)))
            elif isinstance(p, dict) and "prompt_token_ids" in p:
                ids = p["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                                  for t in ids):
                    raise TypeError(f"prompts[{i}]['prompt_token_ids'] must be a list of ints")
                out.append((p.get("prompt"), list(ids)))
            else:
                raise TypeError(f"prompts[{i}] must be a str or a dict with 'prompt_token_ids'; got {p!r:.80}")
        return out

    @staticmethod
    def _params_list(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        sp = list(sampling_params)
        if len(sp) != n or not all(isinstance(s, SamplingParams) for s in sp):
            raise ValueError(f"sampling_params must be one SamplingParams or a list of {n} (one per prompt)")
        return sp

    # --- generate --------------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; returns one RequestOutput per prompt, in order."""
        items = self._normalize(prompts)
        params = self._params_list(sampling_params, len(items))
        groups = self._add(items, params)
        self._run(groups, use_tqdm)
        return [self.engine.request_output(reqs, text) for text, reqs in groups]

    def _add(self, items, params) -> list:
        if self.engine.driven_by_async:
            raise RuntimeError("this engine is being driven by an AsyncLLM (a server?); use that to generate")
        groups = []
        try:
            for (text, ids), sp in zip(items, params):
                groups.append((text, self.engine.add_request(ids, sp)))
        except Exception:
            # a bad prompt fails the call without leaving the earlier ones queued
            self.engine.abort([r.request_id for _, reqs in groups for r in reqs])
            raise
        return groups

    def _run(self, groups, use_tqdm: bool) -> None:
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(groups), desc="Processed prompts", unit="prompt", dynamic_ncols=True)
        done, n_tokens, t0 = 0, 0, time.perf_counter()
        try:
            while self.engine.has_unfinished():
                stepped = self.engine.step()
                n_tokens += len(stepped)
                if bar is not None:
                    finished = sum(all(r.finished for r in reqs) for _, reqs in groups)
                    bar.update(finished - done)
                    done = finished
                    bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s")
        except BaseException:
            # Ctrl-C or an error: drop what this call queued so the engine stays usable
            self.engine.abort([r.request_id for _, reqs in groups for r in reqs if not r.finished])
            raise
        finally:
            if bar is not None:
                bar.close()

    def generate_stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields the request's output after every new token (n=1 or more), the last one finished."""
        items = self._normalize(prompt)
        if len(items) != 1:
            raise ValueError("generate_stream takes one prompt")
        text, reqs = self._add(items, self._params_list(sampling_params, 1))[0]
        try:
            while not all(r.finished for r in reqs):
                stepped = self.engine.step()
                if any(r in reqs for r in stepped):
                    yield self.engine.request_output(reqs, text)
        finally:
            self.engine.abort([r.request_id for r in reqs if not r.finished])

    # --- chat ------------------------------------------------------------------------------------
    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             tools=None, reasoning_effort: str = "medium", tool_choice="auto", use_tqdm: bool = False):
        """One conversation (a list of OpenAI-format messages) or a list of them -> list[ChatOutput].

        The conversation is rendered in harmony; the reply is split into .reasoning (the analysis
        channel), .content (the final answer and commentary preambles) and .tool_calls.
        """
        from .chat import chat_output, prepare_chat
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts "
                             "(or a list of such lists)")
        convs = [messages] if isinstance(messages[0], dict) else list(messages)
        params = self._params_list(sampling_params, len(convs))
        items, sps = [], []
        for conv, sp in zip(convs, params):
            ids, run_sp = prepare_chat(conv, sp if sampling_params is not None else None, tools, tool_choice,
                                       reasoning_effort)
            items.append((None, ids))
            sps.append(run_sp)
        groups = self._add(items, sps)
        self._run(groups, use_tqdm)
        return [chat_output(self.engine.completion(reqs[0]), ids) for (_, ids), (_, reqs) in zip(items, groups)]
