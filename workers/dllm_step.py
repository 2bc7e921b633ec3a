"""One denoising step of many masked-diffusion requests, each at its own block and step, from
one batched forward.

    each request ──► its window (`DiffusionLMState.window`), once per CFG branch
                     = one `Segment` of the flat batch, with the branch's dense KV cache
    one forward  ──► hidden states of every window row; the LM head on the candidates' rows only
    each request ──► its candidates' logits (guided with CFG) ──► `DiffusionLMState.update`

Flat batch rows, e.g. request a refreshing its cache, b with a prefix cache, c with guidance:

    [ a: 0 .. L_a | b: block_start - shift .. L_b | c cond: 0 .. L_c | c uncond: 0 .. L_c ]

A request's KV caches (one per branch) live in its `DiffusionLMRequest`: blocks of the paged
KV cache its runner gave it (`dllm_runner`), or else dense ones allocated at its first
refresh. A request joins or leaves the batch between any two steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from zomni.workers.dllm_attention import DenseKV, Segment
from zomni.workers.dllm_decoding import DecodingParams, DiffusionLMState, guided_logits
from zomni.workers.models.dllm import DiffusionLM


@dataclass(eq=False)
class DiffusionLMRequest:
    state: DiffusionLMState
    kv: list[DenseKV] = field(default_factory=list)  # per branch; empty without a cache


@torch.inference_mode()
def denoise_step(model: DiffusionLM, requests: Sequence[DiffusionLMRequest]) -> list[bool]:
    """Advance every request (none of them done) by one denoising step; per request, whether
    the step completed its current block."""
    device = model.parts()[0].weight.device
    segments: list[Segment] = []
    input_ids: list[torch.Tensor] = []
    logit_rows: list[torch.Tensor] = []
    num_candidates: list[int] = []
    num_rows = 0
    for req in requests:
        state, window = req.state, req.state.window()
        branches = state.branch_tokens()
        if state.params.cache != "none" and not req.kv:
            req.kv = [model.new_kv_cache(state.length) for _ in branches]
        rows = state.logit_rows(window)
        num_candidates.append(rows.numel())
        for b, tokens in enumerate(branches):
            segments.append(Segment(window.start, window.end, req.kv[b] if req.kv else None,
                                    window.read_prefix, window.read_suffix))
            input_ids.append(tokens[window.start: window.end])
            logit_rows.append(rows + num_rows)
            num_rows += window.end - window.start
    hidden = model(torch.cat(input_ids).to(device), segments)
    logits = model.compute_logits(hidden[torch.cat(logit_rows).to(device)]).float()
    completed, row = [], 0
    for req, n in zip(requests, num_candidates):
        cond = logits[row: row + n]
        row += n
        if req.state.params.cfg_scale > 0:
            cond = guided_logits(cond, logits[row: row + n], req.state.params.cfg_scale)
            row += n
        completed.append(req.state.update(cond))
        if req.state.done:
            req.kv = []
    return completed


def generate(model: DiffusionLM, prompts: Sequence[Sequence[int]],
             params: DecodingParams | Sequence[DecodingParams],
             generators: Sequence[torch.Generator | None] | None = None) -> list[list[int]]:
    """Decode every prompt, all of them batched in each step (a request leaves the batch when
    done); the generated tokens of each (`gen_length`, not trimmed at EOS)."""
    all_params = [params] * len(prompts) if isinstance(params, DecodingParams) else list(params)
    generators = list(generators) if generators is not None else [None] * len(prompts)
    requests = [DiffusionLMRequest(DiffusionLMState(p, pp, model.config.mask_token_id,
                                                    model.logits_shift, g))
                for p, pp, g in zip(prompts, all_params, generators)]
    while running := [r for r in requests if not r.state.done]:
        denoise_step(model, running)
    return [r.state.generated_token_ids() for r in requests]
