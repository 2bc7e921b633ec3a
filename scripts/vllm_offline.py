"""Workload W offline on vLLM, for `bench_throughput.py --vllm-python`; runs under vLLM's Python.

    <vllm venv>/bin/python scripts/vllm_offline.py MODEL PROMPTS_JSON OUTPUT_LEN DTYPE RESULT_JSON

Writes {"output_tok_s": ..., "startup_s": ...} to RESULT_JSON (vLLM logs to stdout too).
Only vLLM and the standard library are imported, so it runs in a venv that has no zomni.
"""

import json
import sys
import time


def main() -> None:
    model, prompts_path, output_len, dtype, result_path = sys.argv[1:6]
    from vllm import LLM, SamplingParams, TokensPrompt

    with open(prompts_path) as f:
        prompts = json.load(f)
    start = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, max_model_len=4096, seed=0)
    startup = time.perf_counter() - start
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0][:16])],
                 SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up, as for zomni
    params = SamplingParams(temperature=0.0, max_tokens=int(output_len), ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)
    elapsed = time.perf_counter() - start
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == len(prompts) * int(output_len), n_out
    with open(result_path, "w") as f:
        json.dump({"output_tok_s": n_out / elapsed, "startup_s": startup}, f)


if __name__ == "__main__":
    main()
