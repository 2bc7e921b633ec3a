"""Tensor-parallel linear layers (Megatron style, names as in vLLM / nano-vllm).

    ColumnParallelLinear      W [out, in] split by rows: rank r holds out/tp rows, no collective
    MergedColumnParallelLinear several column layers fused (gate_up): each part split separately
    QKVParallelLinear         q / k / v fused, split by heads; KV heads replicated when fewer
                              KV heads than ranks
    RowParallelLinear         W split by columns: partial sums, then all-reduce (or, with
                              reduce_results=False, the caller's one all-reduce for several)
    ReplicatedLinear          the whole W on every rank (small layers), no collective

Every parameter carries `weight_loader(param, loaded, shard_id=None)`, which copies only this
rank's part of a checkpoint tensor (or lazy safetensors slice) into `param`. `tp_rank` and
`tp_size` default to the torch.distributed world and can be given explicitly (tests shard for a
rank that does not exist).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zomni.workers import cpu_gemm
from zomni.workers.parallel_state import (
    all_reduce,
    full_shape,
    get_tp_rank,
    get_tp_size,
    materialize,
    shard,
)


def _divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what} ({a}) is not divisible by the tensor-parallel size ({b})")
    return a // b


def _check_full(loaded: Any, dim: int, expected: int) -> None:
    got = full_shape(loaded)[dim]
    if got != expected:
        raise ValueError(f"checkpoint tensor has {got} entries on dim {dim}, expected {expected}")


def _copy(param: nn.Parameter, tensor: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, "
                         f"checkpoint shard {tuple(tensor.shape)}")
    param.data.copy_(tensor)


class LinearBase(nn.Module):
    """Holds `weight` [out_per_rank, in_per_rank] and an optional `bias` [out_per_rank]."""

    def __init__(self, in_per_rank: int, out_per_rank: int, bias: bool,
                 tp_rank: int | None, tp_size: int | None):
        super().__init__()
        self.tp_rank = get_tp_rank() if tp_rank is None else tp_rank
        self.tp_size = get_tp_size() if tp_size is None else tp_size
        self.weight = nn.Parameter(torch.empty(out_per_rank, in_per_rank), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed: cpu_gemm.Packed | None = None

    def pack(self, batch_hint: int) -> None:
        """Swap the weight for its packed copy (CPU only; see cpu_gemm)."""
        if cpu_gemm.can_pack(self.weight):
            self.packed = cpu_gemm.pack(self.weight, batch_hint)
            self.weight.data = self.weight.data.new_empty(0)  # the packed copy replaces it

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_gemm.linear(x, self.weight, self.bias, self.packed)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None):
        size = get_tp_size() if tp_size is None else tp_size
        super().__init__(input_size, _divide(output_size, size, "output size"), bias,
                         tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        rows = param.shape[0]
        _check_full(loaded, 0, rows * self.tp_size)
        _copy(param, shard(loaded, 0, self.tp_rank * rows, rows))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel layers stacked on the output dim; `shard_id` is the part's index.

    Per rank: [part 0 rows of this rank | part 1 rows of this rank | ...]
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size)
        self.packed_parts: tuple[cpu_gemm.Packed, cpu_gemm.Packed] | None = None

    def pack(self, batch_hint: int) -> None:
        """Gate and up packed apart (see `silu_and_mul`)."""
        if len(self.output_sizes) != 2 or not cpu_gemm.can_pack(self.weight):
            return super().pack(batch_hint)
        half = self.weight.shape[0] // 2
        self.packed_parts = (cpu_gemm.pack(self.weight[:half], batch_hint),
                             cpu_gemm.pack(self.weight[half:], batch_hint))
        self.weight.data = self.weight.data.new_empty(0)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up for a [gate | up] layer; packed, each product is fused into its
        matmul."""
        if self.packed_parts is None:
            gate, up = self(x).chunk(2, dim=-1)
            return F.silu(gate).mul_(up)
        gate_bias, up_bias = (None, None) if self.bias is None else self.bias.chunk(2)
        gate = cpu_gemm.linear(x, self.weight, gate_bias, self.packed_parts[0], "silu")
        return cpu_gemm.linear(x, self.weight, up_bias, self.packed_parts[1], "mul", gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_parts is None:
            return super().forward(x)
        biases = (None, None) if self.bias is None else self.bias.chunk(2)
        return torch.cat([cpu_gemm.linear(x, self.weight, b, p)
                          for b, p in zip(biases, self.packed_parts)], dim=-1)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        sizes = [_divide(s, self.tp_size, "output size") for s in self.output_sizes]
        offset, size = sum(sizes[:shard_id]), sizes[shard_id]
        _check_full(loaded, 0, self.output_sizes[shard_id])
        _copy(param.data.narrow(0, offset, size), shard(loaded, 0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; `shard_id` is "q", "k" or "v".

    Per rank: [q heads of this rank | k heads | v heads], each head `head_size` rows. With fewer
    KV heads than ranks each KV head is replicated on tp_size / num_kv_heads consecutive ranks.
    """

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int, bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None):
        size = get_tp_size() if tp_size is None else tp_size
        self.head_size = head_size
        self.num_heads = _divide(total_num_heads, size, "number of attention heads")
        if total_num_kv_heads >= size:
            self.num_kv_heads = _divide(total_num_kv_heads, size, "number of KV heads")
        else:
            _divide(size, total_num_kv_heads, "tensor-parallel size vs KV heads")
            self.num_kv_heads = 1
        self.total_num_kv_heads = total_num_kv_heads
        out = (self.num_heads + 2 * self.num_kv_heads) * head_size * size
        super().__init__(hidden_size, out, bias, tp_rank, tp_size)

    def _kv_head_start(self) -> int:
        if self.total_num_kv_heads >= self.tp_size:
            return self.tp_rank * self.num_kv_heads
        return self.tp_rank // (self.tp_size // self.total_num_kv_heads)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        q_rows = self.num_heads * self.head_size
        kv_rows = self.num_kv_heads * self.head_size
        if shard_id == "q":
            offset, size, start = 0, q_rows, self.tp_rank * q_rows
            _check_full(loaded, 0, q_rows * self.tp_size)
        elif shard_id in ("k", "v"):
            offset = q_rows + (kv_rows if shard_id == "v" else 0)
            size, start = kv_rows, self._kv_head_start() * self.head_size
            _check_full(loaded, 0, self.total_num_kv_heads * self.head_size)
        else:
            raise ValueError(f"QKVParallelLinear shard_id must be q, k or v, got {shard_id!r}")
        _copy(param.data.narrow(0, offset, size), shard(loaded, 0, start, size))


class RowParallelLinear(LinearBase):
    """Input dim split over ranks; outputs are partial sums, all-reduced. Bias added once.

    reduce_results=False returns this rank's partial sum (bias included on rank 0 only), for a
    caller that sums several layers' outputs in one all-reduce.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None,
                 reduce_results: bool = True):
        size = get_tp_size() if tp_size is None else tp_size
        super().__init__(_divide(input_size, size, "input size"), output_size, bias,
                         tp_rank, tp_size)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if param.dim() == 1:  # bias: replicated, added on rank 0 only
            _copy(param, materialize(loaded))
            return
        cols = param.shape[1]
        _check_full(loaded, 1, cols * self.tp_size)
        _copy(param, shard(loaded, 1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T + bias (+ residual, fused into the matmul's epilogue when packed)."""
        if self.tp_rank != 0:  # partial sums: bias and residual come once, from rank 0
            out = cpu_gemm.linear(x, self.weight, None, self.packed)
        else:
            epilogue = "none" if residual is None else "add"
            out = cpu_gemm.linear(x, self.weight, self.bias, self.packed, epilogue, residual)
        return all_reduce(out) if self.reduce_results else out


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank, no collective: for layers that run on so few rows
    (embedders, adaLN modulation) that splitting them would not save the collective's time."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, None, None)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        _copy(param, materialize(loaded))
