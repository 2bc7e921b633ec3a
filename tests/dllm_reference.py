"""Masked-diffusion LMs as published, on transformers' Llama / Qwen2: an independent reference
for zomni's `workers/models/dllm.py` and `workers/dllm_decoding.py`.

Reference models (`RefModel`): the folder's safetensors loaded into transformers'
LlamaForCausalLM (LLaDA, its tensor names mapped back to Llama's here) or Qwen2ForCausalLM
(Dream), run with an all-zeros float attention mask: no causal mask. Dream's logits are shifted
as its `_sample` shifts them: the logits of position i are the output of row i - 1.

Reference loops, written from the published code:

    llada_generate      ML-GSAI/LLaDA generate.py `generate` (blocks, low-confidence / random
                        remasking, Gumbel noise in float64, classifier-free guidance)
    dream_sample        Dream generation_utils.py `_sample` / `sample_tokens` (origin,
                        maskgit_plus, topk_margin, entropy), blocks as Fast-dLLM splits them
    fast_dllm_generate  NVlabs/Fast-dLLM llada/generate.py `generate`,
                        `generate_with_prefix_cache`, `generate_with_dual_cache` and
                        `get_transfer_index` (threshold)

They depart from the published code in two places only:
- LLaDA's and Fast-dLLM's noise (Gumbel, random remasking) is drawn from an explicit generator
  for the candidates only (the masked positions of the current block, one row each, in
  position order) instead of for every position; no other row's noise is ever used. Dream's
  loop already draws for its candidates only, from torch's default generator, as published.
- In the Fast-dLLM loops a shifted model (Dream) computes its window from block_start - 1, so
  the block's first position gets its logits from the row before it (Fast-dLLM's own Dream
  variant instead commits that position at each refresh).
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributions as dists
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# transformers >= 5 calls the cache argument `cache`, earlier versions `past_key_values`
_CACHE = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters \
    else "past_key_values"

# LLaDA block tensor -> Llama layer tensor (modeling_llada.py LLaDALlamaBlock:
# x = ff_out(act(ff_proj(x)) * up_proj(x)), so ff_proj is the gate)
_LLADA_TO_LLAMA = {
    "attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
    "ff_norm": "post_attention_layernorm", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}


def _llama_name(name: str) -> str:
    top = {"model.transformer.wte.weight": "model.embed_tokens.weight",
           "model.transformer.ln_f.weight": "model.norm.weight",
           "model.transformer.ff_out.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    m = re.fullmatch(r"model\.transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)", name)
    assert m, name
    return f"model.layers.{m[1]}.{_LLADA_TO_LLAMA[m[2]]}.{m[3]}"


def _hf_model(model_dir: Path) -> tuple[torch.nn.Module, int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    tensors = load_file(model_dir / "model.safetensors")
    if cfg["model_type"] == "llada":
        config = LlamaConfig(
            hidden_size=cfg["d_model"], num_hidden_layers=cfg["n_layers"],
            num_attention_heads=cfg["n_heads"], num_key_value_heads=cfg["n_kv_heads"],
            head_dim=cfg["d_model"] // cfg["n_heads"], intermediate_size=cfg["mlp_hidden_size"],
            vocab_size=cfg["embedding_size"], rms_norm_eps=cfg["rms_norm_eps"],
            rope_theta=cfg["rope_theta"], max_position_embeddings=cfg["max_sequence_length"],
            tie_word_embeddings=cfg["weight_tying"])
        model, shift = LlamaForCausalLM(config), 0
        tensors = {_llama_name(n): t for n, t in tensors.items()}
    else:
        assert cfg["model_type"] == "Dream"
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta",
                "max_position_embeddings", "tie_word_embeddings")
        model, shift = Qwen2ForCausalLM(Qwen2Config(**{k: cfg[k] for k in keys})), 1
    model.load_state_dict(tensors, strict=True)
    return model.float().eval(), shift


class RefModel:
    """Logits aligned with positions (`[B, L, V]`, the row of position i predicts token i)."""

    def __init__(self, model_dir: Path):
        self.model, self.shift = _hf_model(Path(model_dir))

    def _run(self, ids: torch.Tensor, start: int = 0, cache=None, causal: bool = False):
        n = ids.shape[1]
        past = 0 if cache is None else cache.get_seq_length()
        mask = None if causal else torch.zeros(ids.shape[0], 1, n, past + n)
        with torch.no_grad():
            return self.model(input_ids=ids, attention_mask=mask, use_cache=True,
                              position_ids=torch.arange(start, start + n)[None],
                              **({_CACHE: cache} if cache is not None else {}))

    def _align(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1) if self.shift else logits

    def raw_logits(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """The model's own output rows (no shift)."""
        return self._run(x, causal=causal).logits

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._align(self.raw_logits(x))

    def logits_and_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        out = self._run(x)
        kv = [(layer.keys, layer.values) for layer in out[_CACHE].layers]
        return self._align(out.logits), kv

    def window_logits(self, x: torch.Tensor, start: int, stop: int, kv: list,
                      suffix: bool) -> torch.Tensor:
        """Logits of positions [start, stop): rows [start - shift, stop) recomputed, attending
        to the cached K/V of [0, start - shift) (and of [stop, L) with `suffix`)."""
        first = start - self.shift
        cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            keep = [slice(0, first)] + ([slice(stop, x.shape[1])] if suffix else [])
            cache.update(torch.cat([k[:, :, s] for s in keep], 2),
                         torch.cat([v[:, :, s] for s in keep], 2), i)
        return self._run(x[:, first:stop], first, cache).logits[:, : stop - start]


# ---- LLaDA (ML-GSAI/LLaDA generate.py) --------------------------------------------------------


def get_num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, :remainder[i]] += 1
    return num_transfer_tokens


def gumbel_argmax(logits, candidates, temperature, generator):
    """argmax(add_gumbel_noise(logits, temperature)), the noise drawn for `candidates` only."""
    x0 = torch.argmax(logits, dim=-1)
    if temperature > 0:
        chosen = logits[candidates].to(torch.float64)
        noise = torch.rand(chosen.shape, dtype=torch.float64, generator=generator)
        gumbel_noise = (-torch.log(noise)) ** temperature
        x0[candidates] = torch.argmax(chosen.exp() / gumbel_noise, dim=-1)
    return x0


def random_confidence(candidates, generator):
    """Random remasking's torch.rand, drawn for `candidates` only."""
    x0_p = torch.zeros(candidates.shape)
    x0_p[candidates] = torch.rand(int(candidates.sum()), generator=generator)
    return x0_p


def llada_generate(model: RefModel, prompt, steps, gen_length, block_length, mask_id,
                   temperature=0.0, cfg_scale=0.0, remasking="low_confidence", generator=None):
    P = len(prompt)
    x = torch.full((1, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = torch.tensor(prompt)
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        end = P + (num_block + 1) * block_length
        block_mask_index = x[:, P + num_block * block_length: end] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits, un_logits = torch.chunk(model.logits(torch.cat([x, un_x], dim=0)), 2)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model.logits(x)
            candidates = mask_index.clone()
            candidates[:, end:] = False
            x0 = gumbel_argmax(logits, candidates, temperature, generator)
            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = random_confidence(candidates, generator)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, end:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x[0, P:].tolist()


# ---- Dream (generation_utils.py) --------------------------------------------------------------


def top_p_logits(logits, top_p=None):
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_indices_to_remove = cumulative_probs > top_p
    sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
    sorted_indices_to_remove[..., 0] = 0
    mask = torch.zeros_like(logits, dtype=torch.bool, device=logits.device)
    mask = mask.scatter_(-1, sorted_indices, sorted_indices_to_remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits, top_k=None):
    top_k = min(top_k, logits.size(-1))
    indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(indices_to_remove, torch.finfo(logits.dtype).min)


def sample_tokens(logits, temperature=0.0, top_p=None, top_k=None, margin_confidence=False,
                  neg_entropy=False):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        try:
            x0 = dists.Categorical(probs=probs).sample()
            confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
        except Exception:  # noqa: BLE001 - as published (an empty batch of rows)
            confidence, x0 = probs.max(dim=-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        epsilon = 1e-10
        log_probs = torch.log(probs + epsilon)
        confidence = torch.sum(probs * log_probs, dim=-1)
    return confidence, x0


def dream_sample(model: RefModel, prompt, steps, gen_length, mask_token_id, alg,
                 temperature=0.0, top_p=None, top_k=None, eps=1e-3, block_length=None):
    """`_sample` (no attention mask: "full"), its draws from torch's default generator; with
    `block_length`, per block as Fast-dLLM's Dream splits it (steps and timesteps per block,
    positions past the block kept masked)."""
    P = len(prompt)
    x = F.pad(torch.tensor([prompt]), (0, gen_length), value=mask_token_id)
    block_length = block_length or gen_length
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    timesteps = torch.linspace(1, eps, steps + 1)
    for num_block in range(num_blocks):
        end = P + (num_block + 1) * block_length
        for i in range(steps):
            mask_index = x == mask_token_id
            mask_index[:, end:] = False
            logits = model.logits(x)  # shifted: torch.cat([logits[:, :1], logits[:, :-1]], 1)
            mask_logits = logits[mask_index]
            t = timesteps[i]
            s = timesteps[i + 1]
            if alg == "origin":
                p_transfer = 1 - s / t if i < steps - 1 else 1
                x0 = torch.zeros_like(x[mask_index], dtype=torch.long) + mask_token_id
                transfer_index_t_s = torch.rand(*x0.shape) < p_transfer
                _, x0[transfer_index_t_s] = sample_tokens(
                    mask_logits[transfer_index_t_s], temperature=temperature, top_p=top_p,
                    top_k=top_k)
                x[mask_index] = x0.clone()
                continue
            if alg == "maskgit_plus":
                confidence, x0 = sample_tokens(mask_logits, temperature=temperature,
                                               top_p=top_p, top_k=top_k)
            elif alg == "topk_margin":
                confidence, x0 = sample_tokens(mask_logits, temperature=temperature,
                                               top_p=top_p, top_k=top_k,
                                               margin_confidence=True)
            elif alg == "entropy":
                confidence, x0 = sample_tokens(mask_logits, temperature, top_p=top_p,
                                               top_k=top_k, neg_entropy=True)
            else:
                raise RuntimeError(f"Unknown alg: {alg}")
            num_mask_token = mask_index.sum() / mask_index.shape[0]
            number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 \
                else int(num_mask_token)
            full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            if number_transfer_tokens > 0:
                _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
                x_ = torch.zeros_like(x, dtype=torch.long) + mask_token_id
                x_[mask_index] = x0.clone()
                row_indices = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer_index)
                x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    return x[0, P:].tolist()


# ---- Fast-dLLM (llada/generate.py) ------------------------------------------------------------


def get_transfer_index(logits, temperature, remasking, mask_index, x, num_transfer_tokens,
                       threshold=None, generator=None):
    x0 = gumbel_argmax(logits, mask_index, temperature, generator)
    if remasking == "low_confidence":
        p = F.softmax(logits.to(torch.float64), dim=-1)
        x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
    elif remasking == "random":
        x0_p = random_confidence(mask_index, generator)
    else:
        raise NotImplementedError(remasking)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -np.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    if threshold is not None:
        num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j]))
        transfer_index[j, select_index] = True
        if threshold is not None:
            for k in range(1, int(num_transfer_tokens[j])):
                if confidence[j, select_index[k]] < threshold:
                    transfer_index[j, select_index[k]] = False
    return x0, transfer_index


def fast_dllm_generate(model: RefModel, prompt, steps, gen_length, block_length, mask_id,
                       temperature=0.0, remasking="low_confidence", threshold=None,
                       cache="none", generator=None):
    """`generate` (cache "none"), `generate_with_prefix_cache` ("prefix") or
    `generate_with_dual_cache` ("dual")."""
    P = len(prompt)
    x = torch.full((1, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = torch.tensor(prompt)
    num_blocks = gen_length // block_length
    steps = steps // num_blocks

    def transfer(logits, mask_index, xs, i):
        return get_transfer_index(logits, temperature, remasking, mask_index, xs,
                                  num_transfer_tokens[:, i] if threshold is None else None,
                                  threshold, generator)

    for num_block in range(num_blocks):
        start = P + num_block * block_length
        end = start + block_length
        num_transfer_tokens = get_num_transfer_tokens(x[:, start:end] == mask_id, steps)
        if cache == "none":
            i = 0
            while True:
                mask_index = x == mask_id
                logits = model.logits(x)
                mask_index[:, end:] = 0
                x0, transfer_index = transfer(logits, mask_index, x, i)
                x[transfer_index] = x0[transfer_index]
                i += 1
                if (x[:, start:end] == mask_id).sum() == 0:
                    break
            continue
        logits, kv = model.logits_and_kv(x)  # the block's refresh, and its first step
        mask_index = x == mask_id
        mask_index[:, end:] = 0
        x0, transfer_index = transfer(logits, mask_index, x, 0)
        x[transfer_index] = x0[transfer_index]
        stop = x.shape[1] if cache == "prefix" else end
        i = 1
        while (x[:, start:end] == mask_id).sum() > 0:
            mask_index = x[:, start:stop] == mask_id
            mask_index[:, block_length:] = 0
            logits = model.window_logits(x, start, stop, kv, suffix=cache == "dual")
            x0, transfer_index = transfer(logits, mask_index, x[:, start:stop], i)
            x[:, start:stop][transfer_index] = x0[transfer_index]
            i += 1
    return x[0, P:].tolist()
