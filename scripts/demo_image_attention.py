"""Training-time speed-up of scripts/train_demo_image_model.py: the silent T5's 256 rows
computed as one.

The demo's T5 encoder outputs exactly zero (its final RMSNorm weight is zero, and it is frozen):
diffusers' StableDiffusion3Pipeline feeds zeros in T5's place when a pipeline has no T5, but
loading a folder without one needs `text_encoder_3=None` passed by hand (zomni's loader does
not pass it), so the folder keeps a tiny T5 that says nothing. The denoiser's text stream is
then

    [ CLIP-L | CLIP-G states, padded to the T5 width: CLIP_ROWS rows | 256 identical zero rows ]

Identical context rows stay identical through every MMDiT block (a row's update depends only
on itself and on the keys and values that all rows share; SD3 adds no positions to the text
stream), and in softmax attention n identical keys with identical values weigh as one key
with log(n) added to its logit. So training feeds CLIP_ROWS + 1 rows and lets the last one count
256 times: the same function (checked against the full rows by `check_equivalent`), at
64 + 21 instead of 64 + 276 tokens per picture. Generation (diffusers, zomni) runs all the
rows, unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CLIP_ROWS = 20  # the demo's CLIP tokenizers' model_max_length: the rows before the T5 ones
T5_ROWS = 256  # StableDiffusion3Pipeline's (and zomni's) max_sequence_length


class RepeatedLastRowAttention:
    """diffusers' JointAttnProcessor2_0 (no qk norms) where the last context row stands for
    `count` identical rows."""

    def __init__(self, count: int = T5_ROWS):
        self.log_count = math.log(count)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        assert attn.norm_q is None and attn.norm_added_q is None, "qk norms are not handled"
        b, n, _ = hidden_states.shape

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        c = encoder_hidden_states
        q = torch.cat([heads(attn.to_q(hidden_states)), heads(attn.add_q_proj(c))], dim=2)
        k = torch.cat([heads(attn.to_k(hidden_states)), heads(attn.add_k_proj(c))], dim=2)
        v = torch.cat([heads(attn.to_v(hidden_states)), heads(attn.add_v_proj(c))], dim=2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype)
        bias[-1] = self.log_count
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]).to(q.dtype)
        x, c = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            c = attn.to_add_out(c)
        return attn.to_out[1](attn.to_out[0](x)), c


def short_context(context: torch.Tensor) -> torch.Tensor:
    """The pipeline's [B, CLIP_ROWS + 256, D] prompt embeddings -> [B, CLIP_ROWS + 1, D]."""
    assert context.shape[1] == CLIP_ROWS + T5_ROWS, context.shape
    return context[:, : CLIP_ROWS + 1]


@torch.no_grad()
def check_equivalent(transformer, latents, context, pooled, timestep) -> float:
    """Max |difference| between the denoiser on the full context (diffusers' processor) and
    on the short one (ours); the T5 rows of `context` must be identical."""
    assert (context[:, CLIP_ROWS:] == context[:, CLIP_ROWS:CLIP_ROWS + 1]).all()
    processors = transformer.attn_processors
    full = transformer(latents, context, pooled, timestep, return_dict=False)[0]
    transformer.set_attn_processor(RepeatedLastRowAttention())
    short = transformer(latents, short_context(context), pooled, timestep, return_dict=False)[0]
    transformer.set_attn_processor(processors)
    return (full - short).abs().max().item()
