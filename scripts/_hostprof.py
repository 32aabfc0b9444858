import cProfile, pstats, random, time, io
import torch
from gptoss import LLM, SamplingParams
llm = LLM("/tmp/gptoss-20b", moe_backend="triton", max_model_len=4096, progress=False)
rng = random.Random(0)
sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
for _ in range(3):
    llm.generate({"prompt_token_ids": [rng.randrange(199998) for _ in range(2048)]}, sp, use_tqdm=False)
model = llm.engine.model
fwd = model.forward
prof = cProfile.Profile()
def timed(*a, **k):
    torch.cuda.synchronize()
    prof.enable()
    t0 = time.perf_counter()
    out = fwd(*a, **k)
    t1 = time.perf_counter()
    prof.disable()
    torch.cuda.synchronize()
    print(f"host {1e3*(t1-t0):.1f} ms, total {1e3*(time.perf_counter()-t0):.1f} ms")
    return out
model.forward = timed
for _ in range(3):
    llm.generate({"prompt_token_ids": [rng.randrange(199998) for _ in range(2048)]}, sp, use_tqdm=False)
s = io.StringIO()
st = pstats.Stats(prof, stream=s).sort_stats("tottime")
st.print_stats(28)
print(s.getvalue()[-9000:])
s = io.StringIO()
pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
print(s.getvalue()[-7000:])
