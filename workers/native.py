"""Native CPU kernels (`workers/csrc/*.c`), built on first use with the system C compiler.

Plain C called through ctypes, no torch headers: a build takes well under a second and is
cached per source, flags, compiler and CPU in $XDG_CACHE_HOME/zomni (default ~/.cache/zomni),
since `-march=native` code only runs on the CPU it was built for. The kernels use OpenMP; the
library links `libgomp.so.1`, which resolves to the copy torch already loaded, so they run on
torch's thread team and its `torch.set_num_threads`. Without a compiler, or when a build
fails, `load` returns None (the reason is logged once) and callers keep their torch path.
ZOMNI_NATIVE=0 turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger("zomni.worker")

_SOURCES = Path(__file__).with_name("csrc")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-fopenmp"]
# Libraries built from more than their own source: they call these sources' kernels.
_LINKED = {"decoder_layer": ("gemm", "gemm_bf16", "layer_ops", "paged_attention")}
_I64, _F32, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "zomni"


def _cpu_id() -> bytes:
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return b""
    return "\n".join(sorted({x for x in info if x.startswith(("model name", "flags"))})).encode()


@cache
def load(name: str) -> ctypes.CDLL | None:
    """The built library for csrc/<name>.c, or None when it cannot be had."""
    if os.environ.get("ZOMNI_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: native CPU kernels are off (torch fallback)")
        return None
    sources = [_SOURCES / f"{n}.c" for n in (name, *_LINKED.get(name, ()))]
    key = hashlib.sha256(b"".join(s.read_bytes() for s in sources)
                         + " ".join(_FLAGS + [compiler]).encode() + _cpu_id()).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # ranks build at once
                built = Path(tmp, target.name)
                subprocess.run([compiler, *_FLAGS, *map(str, sources), "-o", str(built), "-lmvec",
                                "-lm"],
                               check=True, capture_output=True, text=True, timeout=120)
                os.replace(built, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("building native kernel %s failed, torch fallback: %s", name, detail)
        return None


@cache
def _function(library: str, name: str, argtypes: tuple, restype=None):
    """csrc/<library>.c's `name` with its ctypes signature, or None without the library."""
    lib = load(library)
    if lib is None:
        return None
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn


@cache  # once: these run per layer, every step
def _paged_attention(cache_dtype: torch.dtype = torch.float32):
    name = "bf16" if cache_dtype == torch.bfloat16 else "f32"
    return _function("paged_attention", f"zomni_paged_attention_{name}",
                     (_PTR,) * 7 + (_I64,) * 6 + (_F32, _I64), ctypes.c_int)


_LAYER_OPS_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


@cache
def _rms_norm(dtype: torch.dtype = torch.float32):
    return _function("layer_ops", f"zomni_rms_norm_{_LAYER_OPS_DTYPES[dtype]}",
                     (_PTR,) * 3 + (_I64,) * 3 + (_F32,))


@cache
def _qkv_rope_cache(dtype: torch.dtype = torch.float32):
    return _function("layer_ops", f"zomni_qkv_rope_cache_{_LAYER_OPS_DTYPES[dtype]}",
                     (_PTR, _I64, _I64, _I64, _I64, _I64) + (_PTR,) * 4 + (_F32,) + (_PTR,) * 4,
                     ctypes.c_int)


@cache
def _gemm(dtype: torch.dtype = torch.float32):
    """csrc/gemm.c's fp32 kernel, or csrc/gemm_bf16.c's; None where the CPU lacks what it needs
    (AVX-512; AVX512-BF16 for bf16) or for other dtypes."""
    library, name = {torch.float32: ("gemm", "f32"), torch.bfloat16: ("gemm_bf16", "bf16")}.get(
        dtype, (None, None))
    if library is None or load(library) is None:
        return None
    available = "zomni_gemm_available" if name == "f32" else "zomni_gemm_bf16_available"
    if not _function(library, available, (), ctypes.c_int)():
        return None
    return _function(library, f"zomni_gemm_{name}",
                     (_PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64,
                      ctypes.c_int), ctypes.c_int)


_EPILOGUES = {"none": 0, "silu": 1, "mul": 2, "add": 3}
_PANEL = 16  # output columns per panel (csrc/gemm.c)


def has_layer_ops(x: torch.Tensor, head_dim: int = 2) -> bool:
    """Whether `rms_norm` and `qkv_rope_cache` run for this activation (fp32 or bf16 on the
    CPU) and head size (even, at most 512)."""
    return (x.dtype in _LAYER_OPS_DTYPES and x.device.type == "cpu" and head_dim % 2 == 0
            and head_dim <= 512 and _rms_norm() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm over the last dim of x [..., dim]; a new contiguous tensor."""
    flat = x.dim() != 2
    rows = x.reshape(-1, x.shape[-1]) if flat else x
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype)
    _rms_norm(x.dtype)(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0],
                rows.shape[1], rows.stride(0), eps)
    return out.view(x.shape) if flat else out


def qkv_rope_cache(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor,
                   signed_sin: torch.Tensor, rows: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, q_norm: torch.Tensor | None = None,
                   k_norm: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """From the fused projection's output qkv [T, (H + 2 Hkv) * D]: RoPE'd q [T, H, D]; RoPE'd
    k and v are written into the caches at `rows` (see csrc/layer_ops.c). q_norm / k_norm:
    per-head RMSNorm weights [D] applied before the rotation (Qwen3)."""
    dim = cos.shape[-1]
    out = torch.empty(qkv.shape[0], num_heads, dim, dtype=qkv.dtype)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos, signed_sin = cos.contiguous(), signed_sin.contiguous()
    status = _qkv_rope_cache(qkv.dtype)(
        qkv.data_ptr(), qkv.stride(0), qkv.shape[0], num_heads, num_kv_heads, dim,
        cos.data_ptr(), signed_sin.data_ptr(),
        None if q_norm is None else q_norm.data_ptr(),
        None if k_norm is None else k_norm.data_ptr(), eps,
        rows.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr())
    if status != 0:
        raise ValueError(f"qkv/RoPE kernel: unsupported head_dim {dim}")
    return out


def has_gemm(weight: torch.Tensor) -> bool:
    """Whether `pack_panels` / `gemm` run for this weight: on the CPU, fp32 with AVX-512 or bf16
    with AVX512-BF16."""
    return weight.dim() == 2 and weight.device.type == "cpu" and _gemm(weight.dtype) is not None


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> panels for `gemm`: fp32 [ceil(N / 16), K, 16] (csrc/gemm.c), bf16
    [ceil(N / 16), ceil(K / 2), 16, 2] (csrc/gemm_bf16.c)."""
    n, k = weight.shape
    weight = weight.detach().contiguous()
    if weight.dtype == torch.bfloat16:
        panels = torch.empty(-(-n // _PANEL), -(-k // 2), _PANEL, 2, dtype=weight.dtype)
        library, name = "gemm_bf16", "zomni_gemm_pack_bf16"
    else:
        panels = torch.empty(-(-n // _PANEL), k, _PANEL, dtype=weight.dtype)
        library, name = "gemm", "zomni_gemm_pack_f32"
    _function(library, name, (_PTR, _I64, _I64, _PTR), ctypes.c_int)(
        weight.data_ptr(), n, k, panels.data_ptr())
    return panels


def gemm(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None,
         epilogue: str = "none", other: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) for W packed by `pack_panels` with `n` rows, then `epilogue`:
    "none", "silu", or "mul" / "add" with `other` [..., n]. A new tensor [..., n]."""
    # Called ~5 times a layer every step: the common 2-D case skips reshapes and views.
    k = x.shape[-1]
    flat = x.dim() != 2
    rows = x.reshape(-1, k) if flat else x
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], n, dtype=x.dtype)
    ld_other = 0
    if other is not None:
        if other.dim() != 2:
            other = other.reshape(-1, n)
        if other.stride(-1) != 1:
            other = other.contiguous()
        ld_other = other.stride(0)
    if bias is not None:
        bias = bias.contiguous()
    kernel = _gemm(panels.dtype)
    kernel(rows.data_ptr(), rows.stride(0), panels.data_ptr(),
           None if bias is None else bias.data_ptr(), out.data_ptr(), n,
           None if other is None else other.data_ptr(), ld_other, rows.shape[0], n, k,
           _EPILOGUES[epilogue])
    return out.view(*x.shape[:-1], n) if flat else out


def has_paged_attention(num_heads: int = 1, num_kv_heads: int = 1, head_dim: int = 1) -> bool:
    """Whether the kernel is built and takes this shape (GQA group <= 16, head_dim <= 256,
    KV heads <= 64)."""
    return (_paged_attention() is not None and num_heads // num_kv_heads <= 16
            and head_dim <= 256 and num_kv_heads <= 64)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, kv_lens: torch.Tensor, scale: float,
                    window: int | None, table_of_row: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per row from the paged cache (CPU, fp32 or bf16 caches,
    computed in fp32; see csrc/paged_attention.c): row b attends to its request's first
    kv_lens[b] positions.

    q [B, H, D]; caches [num_blocks, Hkv, block_size, D]; kv_lens [B] int64; block_tables
    [R, max_blocks] int64, row b reading table_of_row[b] ([B] int64; None: row b) -> [B, H, D]
    in q's dtype.
    """
    q32 = q.float().contiguous()
    out = torch.empty_like(q32)
    batch, heads, dim = q.shape
    _, kv_heads, block_size, _ = k_cache.shape
    status = _paged_attention(k_cache.dtype)(
        q32.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
        None if table_of_row is None else table_of_row.data_ptr(), kv_lens.data_ptr(),
        out.data_ptr(), batch, heads, kv_heads, dim, block_size, block_tables.shape[1], scale,
        window or 0)
    if status != 0:
        raise ValueError(f"paged attention kernel: unsupported shape q {tuple(q.shape)}, "
                         f"cache {tuple(k_cache.shape)}")
    return out.to(q.dtype)


@cache
def _argmax():
    if load("argmax") is None:
        return None
    return _function("argmax", "zomni_argmax_f32", (_PTR, _I64, _I64, _I64, _PTR), ctypes.c_int)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for fp32 CPU logits [rows, vocab] (see csrc/argmax.c), torch's elsewhere:
    the first index of each row's maximum, or of its first NaN."""
    if (x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(-1) != 1
            or not x.shape[1] or _argmax() is None):
        return x.argmax(dim=-1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    if _argmax()(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr()) != 0:
        return x.argmax(dim=-1)
    return out


class DecoderLayerArgs(ctypes.Structure):
    """csrc/decoder_layer.c's `Layer`: what one layer's call needs that never changes."""

    _fields_ = ([(name, _PTR) for name in (
        "input_norm", "post_norm", "q_norm", "k_norm", "qkv", "qkv_bias", "o", "o_bias", "gate",
        "gate_bias", "up", "up_bias", "down", "down_bias", "k_cache", "v_cache")]
        + [(name, _I64) for name in (
            "hidden", "heads", "kv_heads", "head_dim", "intermediate", "window")]
        + [(name, _F32) for name in ("input_eps", "post_eps", "qk_eps", "scale")])


class DecoderStepArgs(ctypes.Structure):
    """csrc/decoder_layer.c's `Step`: one step's metadata and workspace, shared by the layers."""

    _fields_ = ([(name, _I64) for name in ("T", "block_size", "max_blocks")]
                + [(name, _PTR) for name in (
                    "cos", "ssin", "cache_rows", "block_tables", "token_request", "kv_lens",
                    "h", "qkv", "q", "attn", "mid", "gate", "act", "q32", "attn32")])


@cache
def _decoder_layer(dtype: torch.dtype = torch.float32):
    if (_gemm(dtype) is None or dtype not in _LAYER_OPS_DTYPES or _rms_norm(dtype) is None
            or _paged_attention(dtype) is None):
        return None
    return _function("decoder_layer", f"zomni_decoder_layer_{_LAYER_OPS_DTYPES[dtype]}",
                     (_PTR,) * 4, ctypes.c_int)


def has_decoder_layer(dtype: torch.dtype = torch.float32) -> bool:
    """Whether `decoder_layer` runs here for layers in `dtype` (fp32, or bf16 on AVX512-BF16,
    on a CPU with the native kernels)."""
    return _decoder_layer(dtype) is not None


def decoder_layer(layer: int, step: int, x: torch.Tensor, out: torch.Tensor) -> None:
    """One decoder layer, x [T, hidden] -> out [T, hidden] (see csrc/decoder_layer.c); `layer`
    and `step` are the addresses of a `DecoderLayerArgs` and a `DecoderStepArgs`."""
    status = _decoder_layer(x.dtype)(layer, step, x.data_ptr(), out.data_ptr())
    if status != 0:
        raise ValueError(f"decoder layer kernel failed ({status}): unsupported shape")
