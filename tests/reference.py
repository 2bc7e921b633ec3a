"""transformers as the reference: greedy tokens and the logits behind each choice."""

from __future__ import annotations

import functools

import torch

# Two tokens within this many logits of each other in the reference are a near-tie: fp32
# kernels that sum in another order may legitimately pick either.
NEAR_TIE = 1e-3


@functools.lru_cache(maxsize=8)
def _load(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # ignore_eos: run to max_new_tokens
    return model.eval()


def hf_greedy(model_dir, prompt_ids: list[int], max_new_tokens: int):
    """(generated token ids, [per-step logits of shape [vocab]]) from transformers generate()."""
    model = _load(str(model_dir))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             return_dict_in_generate=True, output_logits=True,
                             pad_token_id=0)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    return tokens, [step[0] for step in out.logits]


def assert_greedy_match(model_dir, prompt_ids: list[int], ours: list[int]) -> int:
    """Assert `ours` equals the reference up to a near-tie; returns how many tokens matched."""
    ref, logits = hf_greedy(model_dir, prompt_ids, len(ours))
    for t, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            gap = abs(logits[t][a].item() - logits[t][b].item())
            assert gap <= NEAR_TIE, (
                f"token {t}: zomni chose {a}, transformers {b}, logit gap {gap:.2e} "
                f"(> near-tie {NEAR_TIE})\nzomni {ours}\nref   {ref}")
            return t  # past a tie the two continuations legitimately differ
    return len(ours)
