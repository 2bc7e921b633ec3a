"""The decoder layers of a model on the CPU, one native call each (csrc/decoder_layer.c), in fp32
or (on AVX512-BF16) bf16.

`DecoderLayer.forward` calls nine kernels through nine Python wrappers; the native layer calls
the same kernels in the same order from C, into a workspace kept across steps, so the outputs
are identical. That path stays the reference and covers everything this one does not: tensor
parallelism, GPUs, other dtypes, and weights or shapes the kernels do not take.
ZOMNI_NATIVE_LAYERS=0 turns this path off (to time each kernel, or to compare).
"""

from __future__ import annotations

import ctypes
import os

import torch

from zomni.workers import native
from zomni.workers.context import get_context
from zomni.workers.cpu_gemm import Panels
from zomni.workers.parallel_state import get_tp_size


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _panels(packed) -> torch.Tensor | None:
    return packed.data if isinstance(packed, Panels) else None


class NativeLayers:
    """Every layer's fixed arguments, and the workspace (grown to the largest step seen)."""

    def __init__(self, args: list[native.DecoderLayerArgs], keep: list[torch.Tensor],
                 widths: dict[str, int], dtype: torch.dtype):
        self.args = args
        self.dtype = dtype
        self.addresses = [ctypes.addressof(a) for a in args]
        self._keep = keep  # what the structs point into
        self.widths = widths
        self.rows = 0
        self.space: dict[str, torch.Tensor] = {}

    @classmethod
    def build(cls, layers, x: torch.Tensor) -> NativeLayers | None:
        """For `layers` (DecoderLayer modules, weights packed, KV cache set) and activations
        like `x`; None when any layer cannot take the native call."""
        if (x.device.type != "cpu" or get_tp_size() != 1
                or os.environ.get("ZOMNI_NATIVE_LAYERS", "1") == "0"
                or not native.has_decoder_layer(x.dtype)):
            return None
        args, keep = [], []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            kernel = attn.attn
            parts = mlp.gate_up_proj.packed_parts or (None, None)
            panels = [_panels(attn.qkv_proj.packed), _panels(attn.o_proj.packed),
                      _panels(parts[0]), _panels(parts[1]), _panels(mlp.down_proj.packed)]
            if (any(p is None for p in panels) or kernel.k_cache.dtype != x.dtype
                    or kernel.k_cache.numel() == 0
                    or not native.has_layer_ops(x, kernel.head_dim)
                    or not native.has_paged_attention(kernel.num_heads, kernel.num_kv_heads,
                                                      kernel.head_dim)):
                return None
            gate_bias, up_bias = (None, None) if mlp.gate_up_proj.bias is None else \
                mlp.gate_up_proj.bias.chunk(2)
            tensors = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                       attn.q_norm.weight if attn.qk_norm else None,
                       attn.k_norm.weight if attn.qk_norm else None,
                       panels[0], attn.qkv_proj.bias, panels[1], attn.o_proj.bias,
                       panels[2], gate_bias, panels[3], up_bias, panels[4], mlp.down_proj.bias,
                       kernel.k_cache, kernel.v_cache]
            tensors = [None if t is None else t.detach().contiguous() for t in tensors]
            keep += [t for t in tensors if t is not None]
            args.append(native.DecoderLayerArgs(
                *map(_ptr, tensors), x.shape[-1], kernel.num_heads, kernel.num_kv_heads,
                kernel.head_dim, parts[0].out_features, kernel.sliding_window or 0,
                layer.input_layernorm.eps, layer.post_attention_layernorm.eps,
                attn.q_norm.eps if attn.qk_norm else 0.0, kernel.scale))
        first = args[0]
        qkv = (first.heads + 2 * first.kv_heads) * first.head_dim
        widths = {"h": first.hidden, "qkv": qkv, "q": first.heads * first.head_dim,
                  "attn": first.heads * first.head_dim, "mid": first.hidden,
                  "gate": first.intermediate, "act": first.intermediate,
                  "even": first.hidden, "odd": first.hidden}
        if x.dtype != torch.float32:  # the attention's fp32 input and output
            widths |= {"q32": widths["q"], "attn32": widths["attn"]}
        return cls(args, keep, widths, x.dtype)

    def _reserve(self, rows: int) -> None:
        if rows > self.rows:
            self.space = {name: torch.empty(rows, width, dtype=torch.float32 if name.endswith(
                "32") else self.dtype) for name, width in self.widths.items()}
            self.rows = rows

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] through every layer; the result is a view of the workspace, valid
        until the next call."""
        ctx = get_context()
        rows = x.shape[0]
        self._reserve(rows)
        space = {name: t[:rows] for name, t in self.space.items()}
        cos, sin = cos.contiguous(), sin.contiguous()
        inputs = (cos, sin, ctx.write_rows(self.args[0].kv_heads), ctx.block_tables,
                  ctx.token_request, ctx.token_kv_lens)
        step = native.DecoderStepArgs(
            rows, ctx.block_size, ctx.block_tables.shape[1], *(t.data_ptr() for t in inputs),
            *(space[name].data_ptr() for name in ("h", "qkv", "q", "attn", "mid", "gate", "act")),
            *(space[name].data_ptr() if name in space else None for name in ("q32", "attn32")))
        step_address = ctypes.addressof(step)
        x = x.contiguous()
        outs = (space["even"], space["odd"])
        for i, layer in enumerate(self.addresses):
            native.decoder_layer(layer, step_address, x, outs[i % 2])
            x = outs[i % 2]
        return x
