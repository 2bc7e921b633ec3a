#!/usr/bin/env python3
"""Train zomni's demo masked-diffusion LM: a small LLaDA on the Python standard library's sources.

The companion of `zomni-demo` (scripts/train_demo_model.py), trained on the same corpus, split,
tokenizer and token windows, at the same size and token budget, with LLaDA's masked-diffusion
objective instead of next-token prediction. The result is an HF folder in LLaDA's layout
(config.json with model_type "llada", tensors model.transformer.*), which zomni serves with
`workers/models/dllm.py`, written to `zomni/demo_dllm_model/` with a TRAINING.md comparing it
with the AR demo.

Steps (deterministic for a given --seed on a given machine and Python version):

1. Corpus, tokenizer, data: `demo_model_data` as the AR demo builds them (same files held out,
   same BPE, same shuffled documents and 257-token windows); then the mask token
   `<|mdm_mask|>` is appended to the vocabulary (id 4096), as LLaDA reserves one.
2. Model (`DemoDLLM`, plain torch): a Llama-style transformer without a causal mask (RMSNorm,
   rotary, SwiGLU, GQA), LLaDA's module names, embeddings tied to the LM head in training and
   exported as two tensors (LLaDA's layout has its own `ff_out`).
3. Objective (LLaDA's pretraining, `forward_process` of its guidelines): per sequence
   t ~ U(0, 1) (stratified over the batch), p = (1 - eps) t + eps, each token replaced by the
   mask token with probability p; cross-entropy on the masked positions weighted 1 / p,
   summed and divided by batch x length. 1% of the batches are cut to a random length first.
4. Training: the AR demo's optimizer and schedule (AdamW, warmup, cosine) at a third of its
   peak learning rate, its window order.
5. Evaluation: the masked-diffusion bound on the NLL of each validation window's 256 targets
   given its first token (LLaDA's lower-variance estimator: l ~ U{1..256} targets masked at
   random, mean cross-entropy over them), with a fixed Monte-Carlo seed.
6. Export, reload through zomni's loader (logits must match the training model's), samples
   from `dllm_step.generate()`, the AR demo's loss and samples on the same text, TRAINING.md
   (`demo_dllm_report.py`).

Usage:
    python scripts/train_demo_dllm.py                              # full run (~14 min on 2 cores)
    python scripts/train_demo_dllm.py --steps 20 --out /tmp/dllm   # quick smoke run
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from demo_dllm_report import DLLMEval, Run, compare_and_report, save_folder
from demo_model_data import Data, build_tokenizer, encode_data, log, split_corpus
from torch import nn
from train_demo_model import (
    TrainLog,
    batch_order,
    load_average,
    make_optimizer,
    optimizer_step,
    setup_runtime,
    training_parser,
)
from train_demo_model import TrainResult as ARTrainResult

MASK = "<|mdm_mask|>"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "zomni" / "demo_dllm_model"
EVAL_SEED = 1234  # Monte-Carlo masks of every evaluation; independent of --seed


# --------------------------------------------------------------------------------------------
# model


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Block(nn.Module):
    """LLaDALlamaBlock: x += attn_out(attn(attn_norm(x))); x += ff_out(silu(ff_proj) * up_proj)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, intermediate: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.attn_norm = nn.RMSNorm(hidden, eps=eps)
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.attn_out = nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.ff_norm = nn.RMSNorm(hidden, eps=eps)
        self.ff_proj = nn.Linear(hidden, intermediate, bias=False)  # the SiLU gate
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.ff_out = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # no mask: every position attends to every other (the model is bidirectional)
        o = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.heads != self.kv_heads)
        x = x + self.attn_out(o.transpose(1, 2).reshape(b, n, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class DemoDLLM(nn.Module):
    """Parameter names are LLaDA's without the leading "model." (see `export_tensors`)."""

    def __init__(self, args, vocab_size: int):
        super().__init__()
        self.rope_theta = args.rope_theta
        self.head_dim = args.hidden // args.heads
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab_size, args.hidden),
            "blocks": nn.ModuleList(Block(args.hidden, args.heads, args.kv_heads,
                                          args.intermediate, args.rms_norm_eps)
                                    for _ in range(args.layers)),
            "ln_f": nn.RMSNorm(args.hidden, eps=args.rms_norm_eps),
            "ff_out": nn.Linear(args.hidden, vocab_size, bias=False),
        })
        self.transformer.ff_out.weight = self.transformer.wte.weight  # tied
        for m in self.modules():  # transformers' Llama init
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def rope(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** exponents)
        freqs = torch.arange(n).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> final-norm hidden states [B, L, hidden]."""
        cos, sin = self.rope(ids.shape[1])
        x = self.transformer.wte(ids)
        for block in self.transformer.blocks:
            x = block(x, cos, sin)
        return self.transformer.ln_f(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.ff_out(self.hidden_states(ids))

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """LLaDA's checkpoint names; the tied head becomes its own copy."""
        return {f"model.{name}": t.detach().clone().contiguous()
                for name, t in self.state_dict(keep_vars=False).items()}


# --------------------------------------------------------------------------------------------
# objective


def forward_process(x: torch.Tensor, mask_id: int, eps: float, gen: torch.Generator):
    """LLaDA's forward process: (noisy x, masked positions, per-sequence mask probability p).

    The batch's t are stratified, t_i = (u + i / B) mod 1 with one u ~ U(0, 1): each t_i is
    U(0, 1) as LLaDA draws it, so the objective's expectation is unchanged, and every batch
    covers [0, 1) evenly (MDLM's low-discrepancy sampler), which cuts the variance of the
    1 / p-weighted loss: at batch 8 the independent draws learn markedly slower (TRAINING.md)."""
    b, n = x.shape
    t = (torch.rand(1, generator=gen) + torch.arange(b) / b) % 1
    p = (1 - eps) * t + eps
    masked = torch.rand(b, n, generator=gen) < p[:, None]
    return torch.where(masked, mask_id, x), masked, p


def diffusion_loss(model: DemoDLLM, x: torch.Tensor, mask_id: int, eps: float,
                   gen: torch.Generator) -> torch.Tensor:
    """sum over masked positions of CE / p, divided by B x L. Only the masked rows go
    through the LM head (its [hidden, vocab] matmul is a fifth of the model's FLOPs)."""
    noisy, masked, p = forward_process(x, mask_id, eps, gen)
    hidden = model.hidden_states(noisy)[masked]
    ce = F.cross_entropy(model.transformer.ff_out(hidden), x[masked], reduction="none")
    p_rows = p[:, None].expand_as(masked)[masked]
    return (ce / p_rows).sum() / x.numel()


def elbo_masks(num: int, length: int, seed: int) -> torch.Tensor:
    """[num, length] bool: for each row, l ~ U{1..length} positions masked, chosen uniformly."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, length + 1, (num, 1), generator=gen)
    ranks = torch.rand(num, length, generator=gen).argsort(-1).argsort(-1)
    return ranks < counts


@torch.no_grad()
def elbo_bound(model: DemoDLLM, windows: torch.Tensor, mask_id: int, samples: int,
               batch_size: int, seed: int = EVAL_SEED) -> tuple[float, float]:
    """(bound on the NLL in nats per target token, its Monte-Carlo standard error) of each
    window's tokens 1.. given token 0 (the AR evaluation's targets and context):

        -log p(y | x0) / L  <=  E_l [ (1 / l) sum over the l masked targets of CE ]

    (LLaDA, "Large Language Diffusion Models", eq. 6's lower-variance form)."""
    model.eval()
    seqs = windows.repeat_interleave(samples, dim=0)
    masked = torch.zeros_like(seqs, dtype=torch.bool)
    masked[:, 1:] = elbo_masks(len(seqs), seqs.shape[1] - 1, seed)
    estimates = []
    for i in range(0, len(seqs), batch_size):
        x, m = seqs[i:i + batch_size], masked[i:i + batch_size]
        logits = model(torch.where(m, mask_id, x))
        ce = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")
        estimates.append((ce * m).sum(1) / m.sum(1))
    model.train()
    est = torch.cat(estimates).double()
    per_window = est.view(-1, samples).mean(1)
    return float(per_window.mean()), float(per_window.std() / math.sqrt(len(per_window)))


# --------------------------------------------------------------------------------------------
# training


@dataclass
class TrainResult(ARTrainResult):  # history holds the validation bound
    random_length_batches: int


def training_windows(data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """The AR run's (seq_len + 1)-token windows, whole: [x0, y0 .. y_{L-1}]."""
    return (torch.cat([data.xtr[:, :1], data.ytr], 1), torch.cat([data.xva[:, :1], data.yva], 1))


def train(model: DemoDLLM, opt, args, data: Data, mask_id: int) -> TrainResult:
    """args.steps optimizer steps, windows visited in the AR run's seeded order."""
    train_w, val_w = training_windows(data)
    noise_gen = torch.Generator().manual_seed(args.seed + 1)  # masks and random lengths
    n_val = min(args.eval_windows, len(val_w))
    random_length, step = 0, 0
    model.train()
    progress = TrainLog(args, args.batch_size * train_w.shape[1], val_label="val bound")
    for step, b in zip(range(args.steps), batch_order(len(train_w), args)):  # the AR run's
        x = train_w[b]
        if torch.rand(1, generator=noise_gen).item() < args.random_length_frac:
            x = x[:, :int(torch.randint(1, x.shape[1] + 1, (1,), generator=noise_gen))]
            random_length += 1
        loss = diffusion_loss(model, x, mask_id, args.eps, noise_gen)
        lv = optimizer_step(model, opt, loss, step, args)
        if progress.after_step(step, lv, lambda: elbo_bound(
                model, val_w[:n_val], mask_id, 2, args.batch_size)[0], n_val):
            break
    return TrainResult(progress.history, step + 1, progress.stopped_early, progress.seconds(),
                       random_length)


def final_evaluation(model: DemoDLLM, args, data: Data, mask_id: int) -> DLLMEval:
    t0 = time.perf_counter()
    _, val_w = training_windows(data)
    bound, stderr = elbo_bound(model, val_w, mask_id, args.eval_samples, args.batch_size)
    n_targets = data.yva.numel()
    bpb = bound * n_targets / math.log(2) / data.val_target_bytes
    r = DLLMEval(bound, stderr, bpb, n_targets, args.eval_samples, time.perf_counter() - t0)
    log(f"final: val NLL bound {bound:.4f} +- {stderr:.4f} nats/token ({bpb:.3f} bits/byte) "
        f"on {n_targets:,} val tokens, {args.eval_samples} masks per window; eval {r.seconds:.0f}s")
    return r


def parse_args(argv=None) -> argparse.Namespace:
    ap = training_parser(__doc__, DEFAULT_OUT, lr=1e-3, time_budget=25 * 60)  # lr: see TRAINING.md
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--rms-norm-eps", type=float, default=1e-6)
    ap.add_argument("--eps", type=float, default=1e-3, help="smallest mask probability")
    ap.add_argument("--random-length-frac", type=float, default=0.01,
                    help="fraction of batches cut to a random length (LLaDA: 1%%)")
    ap.add_argument("--eval-samples", type=int, default=4,
                    help="Monte-Carlo masks per validation window in the final evaluation")
    ap.add_argument("--ar-model", type=Path, default=REPO / "zomni" / "demo_model",
                    help="the AR demo to compare with")
    ap.add_argument("--gen-length", type=int, default=64, help="tokens per sample")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start, cpu_start, load_start = time.perf_counter(), time.process_time(), load_average()
    setup_runtime(args)
    log(f"1-minute load average at start: {load_start:.2f}")

    corpus = split_corpus(args.val_every)  # 1. corpus, tokenizer, data (the AR demo's)
    tt = build_tokenizer(corpus, args.vocab_size)
    data = encode_data(args, corpus, tt)
    tt.tok.add_special_tokens([MASK])  # after encoding: the windows are the AR run's
    mask_id, vocab_size = tt.tok.token_to_id(MASK), tt.tok.get_vocab_size()
    log(f"mask token {MASK} = {mask_id}; vocab {vocab_size}")

    torch.manual_seed(args.seed)
    model = DemoDLLM(args, vocab_size)  # 2. model
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: bidirectional, hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
        f"({args.kv_heads} kv), SwiGLU {args.intermediate}: {n_params:,} params (tied)")
    opt = make_optimizer(model, args)
    trained = train(model, opt, args, data, mask_id)  # 3-4. objective, training
    evald = final_evaluation(model, args, data, mask_id)  # 5. evaluation

    save_folder(args, model, tt, mask_id)  # 6. export, check, compare, TRAINING.md
    check_batch = training_windows(data)[1][:2].clone()
    check_batch[elbo_masks(2, check_batch.shape[1], seed=EVAL_SEED + 1)] = mask_id
    compare_and_report(Run(args, model, corpus, tt, data, mask_id, n_params, trained, evald,
                           check_batch, (t_start, cpu_start, load_start)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
