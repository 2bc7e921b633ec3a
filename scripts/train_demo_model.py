#!/usr/bin/env python3
"""Train zomni's demo model: a small Qwen3 LM on the Python standard library's own sources.

There is no model hub on the machines zomni is built and tested on, so the default model that
`zomni serve` loads is trained here, from text every Python install has: the `.py` files (code,
comments, docstrings) under `sysconfig.get_paths()["stdlib"]`, minus tests, site-packages and
generated tables. The result is written in HF layout (config.json, model.safetensors,
tokenizer.json + tokenizer_config.json, chat_template.jinja, generation_config.json) plus a
TRAINING.md with the numbers, to `zomni/demo_model/` by default.

Steps (all deterministic for a given --seed on a given machine and Python version; the corpus
is whatever stdlib the running interpreter has, so 3.10 / 3.11 / 3.12 give different models):

1. Corpus: sorted stdlib `.py` paths; every `--val-every`-th file is held out for validation.
2. Tokenizer: byte-level BPE (tokenizers library) trained on the training files only, with
   special tokens `<|endoftext|>` (document separator, pad), `<|im_start|>`, `<|im_end|>` (eos)
   and a ChatML chat template.
3. Data: each training file becomes one document; in addition, every documented top-level
   function of the training files becomes a ChatML exchange (user asks for the function by its
   signature and docstring summary, assistant answers with its source in a ```python fence and
   `<|im_end|>`), so chat
   requests get code back and stop. Documents are shuffled with the seed, joined with
   `<|endoftext|>`, cut into `--seq-len` + 1 windows and visited in a seeded permutation.
4. Model: Qwen3ForCausalLM (transformers' modeling code), tied embeddings, fp32, AdamW with
   linear warmup and cosine decay, gradient clipping, a fixed number of steps.
5. Evaluation: validation loss / perplexity on all held-out windows, against a unigram
   baseline (add-one smoothed token frequencies of the training tokens, scored on the same
   validation targets); bits per byte for both; a greedy sample from "def fibonacci(n):\\n".

Usage:
    python scripts/train_demo_model.py                       # full run (~13 min on 2 cores)
    python scripts/train_demo_model.py --steps 20 --out /tmp/demo   # quick smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from demo_model_data import EOT, IM_END, Data, build_tokenizer, encode_data, log, split_corpus
from demo_model_report import RunStats, sample_saved, save, write_training_md

SAMPLE_PROMPT = "def fibonacci(n):\n"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "zomni" / "demo_model"


# --------------------------------------------------------------------------------------------
# training


def build_model(args, vocab_size: int, ids: dict[str, int]):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=args.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=ids[IM_END],
        pad_token_id=ids[EOT],
        use_cache=True,
    )
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(args.seed)
    model = Qwen3ForCausalLM(config)
    model.tie_weights()
    return model


def evaluate(model, x, y, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over all windows."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(input_ids=x[i:i + batch_size], use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                   y[i:i + batch_size].reshape(-1), reduction="sum")
            total += loss.item()
            count += y[i:i + batch_size].numel()
    model.train()
    return total / count


def unigram_loss(train_ids, targets, vocab_size: int) -> float:
    """Cross-entropy (nats) of an add-one smoothed unigram model of the training tokens."""
    import torch

    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[targets.reshape(-1)].mean())


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.lr * args.min_lr_ratio
    return floor + 0.5 * (args.lr - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    history: list[tuple[int, float, float]]  # (step, smoothed train loss, val loss)
    steps_done: int
    stopped_early: bool
    seconds: float


@dataclass
class EvalResult:
    val_loss: float
    uni_loss: float
    n_targets: int
    bpb: float
    uni_bpb: float
    seconds: float


def training_parser(doc: str, out: Path, lr: float, time_budget: float) -> argparse.ArgumentParser:
    """The flags both demos take (corpus, tokenizer, model size, optimizer, schedule); the
    defaults are the AR demo's but for `out`, the peak `lr` and the `time_budget`."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=out, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--val-every", type=int, default=25,
                    help="hold out every N-th file (sorted by path) for validation")
    ap.add_argument("--vocab-size", type=int, default=4096, help="BPE vocab")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--max-positions", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256, help="targets per window (+1 context)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1500,
                    help="optimizer steps (the run is defined by steps, not by time)")
    ap.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=75)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-windows", type=int, default=32,
                    help="validation windows used for the periodic (not the final) evaluation")
    ap.add_argument("--time-budget", type=float, default=time_budget,
                    help="safety stop in seconds for the training loop; a run cut short by it "
                         "is reported as such (and is not the deterministic run)")
    ap.add_argument("--no-chat", action="store_true", help="skip the ChatML examples")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    return training_parser(__doc__, DEFAULT_OUT, lr=3e-3, time_budget=17 * 60).parse_args(argv)


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def setup_runtime(args) -> None:
    """Thread and determinism settings; must run before torch is first imported."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    # Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads
    # starve everyone (measured 2-4x slower steps under load); numerics are unaffected.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)


def param_counts(model) -> tuple[int, int]:
    """(all parameters, embedding parameters); the LM head is tied to the embedding."""
    n_params = sum(p.numel() for p in model.parameters())
    return n_params, model.get_input_embeddings().weight.numel()


def make_optimizer(model, args):
    """AdamW; weight decay on matrices only (not on norms)."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )


def batch_order(num_windows: int, args):
    """Batches of `args.batch_size` window indices, in a permutation seeded with `args.seed`
    and redrawn once too few windows are left for a batch (both demos visit windows so)."""
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    order, pos = torch.randperm(num_windows, generator=gen), 0
    while True:
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(num_windows, generator=gen), 0
        yield order[pos:pos + args.batch_size]
        pos += args.batch_size


def optimizer_step(model, opt, loss, step: int, args) -> float:
    """The step's learning rate (`lr_at`), backward, gradient clipping, AdamW; the loss value."""
    import torch

    for g in opt.param_groups:
        g["lr"] = lr_at(step, args)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()
    return loss.item()


class TrainLog:
    """What both demos do after each optimizer step: the smoothed training loss, a log line
    every 25 steps, the periodic evaluation (`history`) and the time budget's safety stop."""

    def __init__(self, args, tokens_per_step: int, val_label: str = "val"):
        self.args, self.tokens_per_step, self.val_label = args, tokens_per_step, val_label
        self.history: list[tuple[int, float, float]] = []  # (step, smoothed loss, val loss)
        self.smooth: float | None = None
        self.stopped_early = False
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def after_step(self, step: int, loss: float, evaluate, n_val: int) -> bool:
        """Record step `step`'s loss; `evaluate()` gives the loss on the first `n_val`
        validation windows. True when the run must stop (the time budget is spent)."""
        args = self.args
        self.smooth = loss if self.smooth is None else 0.95 * self.smooth + 0.05 * loss
        done, elapsed = step + 1, self.seconds()
        if done % 25 == 0 or done == 1:
            log(f"step {done:5d}/{args.steps}  loss {loss:.3f} (avg {self.smooth:.3f})  "
                f"lr {lr_at(step, args):.2e}  {elapsed:6.0f}s  "
                f"{done * self.tokens_per_step / elapsed:,.0f} tok/s")
        if done % args.eval_every == 0 and done < args.steps:
            vl = evaluate()
            self.history.append((done, self.smooth, vl))
            log(f"  eval @ {done}: train {self.smooth:.3f}  {self.val_label} {vl:.3f} "
                f"(first {n_val} windows)")
        if elapsed > args.time_budget and done < args.steps:
            log(f"WARNING: time budget {args.time_budget:.0f}s exceeded at step {done}; "
                "stopping early (this run is not the deterministic full run)")
            self.stopped_early = True
        return self.stopped_early


def train(model, opt, args, data: Data) -> TrainResult:
    """args.steps optimizer steps over a seeded permutation of the windows, redrawn per epoch."""
    import torch.nn.functional as F

    xtr, ytr, xva, yva = data.xtr, data.ytr, data.xva, data.yva
    tokens_per_step = args.batch_size * args.seq_len
    log(f"training: {args.steps} steps x {tokens_per_step} tokens = "
        f"{args.steps * tokens_per_step / len(data.train_ids):.2f} epochs")
    model.train()
    n_val = min(args.eval_windows, len(xva))
    progress = TrainLog(args, tokens_per_step)
    step = 0
    for step, b in zip(range(args.steps), batch_order(len(xtr), args)):
        logits = model(input_ids=xtr[b], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ytr[b].reshape(-1))
        lv = optimizer_step(model, opt, loss, step, args)
        if progress.after_step(step, lv, lambda: evaluate(model, xva[:n_val], yva[:n_val],
                                                          args.batch_size), n_val):
            break
    return TrainResult(progress.history, step + 1, progress.stopped_early, progress.seconds())


def final_evaluation(model, args, data: Data, vocab_size: int) -> EvalResult:
    """Loss and bits per byte on all validation windows, for the model and a unigram baseline."""
    t0 = time.perf_counter()
    val_loss = evaluate(model, data.xva, data.yva, args.batch_size)
    uni_loss = unigram_loss(data.train_ids, data.yva, vocab_size)
    n_targets = data.yva.numel()
    bpb = val_loss * n_targets / math.log(2) / data.val_target_bytes
    uni_bpb = uni_loss * n_targets / math.log(2) / data.val_target_bytes
    r = EvalResult(val_loss, uni_loss, n_targets, bpb, uni_bpb, time.perf_counter() - t0)
    log(f"final: val loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f}, {bpb:.3f} bits/byte)  "
        f"unigram {uni_loss:.4f} (ppl {math.exp(uni_loss):.2f}, {uni_bpb:.3f} bits/byte)  "
        f"on {n_targets:,} val tokens; eval {r.seconds:.1f}s")
    return r


def generation_config(ids: dict[str, int]) -> dict:
    return {"bos_token_id": None, "eos_token_id": [ids[IM_END], ids[EOT]],
            "pad_token_id": ids[EOT], "do_sample": False}


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    load_start = load_average()
    setup_runtime(args)

    corpus = split_corpus(args.val_every)  # 1. corpus
    tt = build_tokenizer(corpus, args.vocab_size)  # 2. tokenizer
    data = encode_data(args, corpus, tt)  # 3. data
    model = build_model(args, tt.vocab_size, tt.ids)  # 4. model
    n_params, n_embed = param_counts(model)
    log(f"model: Qwen3 hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
        f"({args.kv_heads} kv), ffn {args.intermediate}: {n_params:,} params "
        f"({n_params - n_embed:,} non-embedding), tied embeddings")
    opt = make_optimizer(model, args)
    trained = train(model, opt, args, data)  # 5. train
    evald = final_evaluation(model, args, data, tt.vocab_size)  # 6. evaluate

    out: Path = args.out
    save(out, model, tt.fast, generation_config(tt.ids))  # 7. save
    sample, chat_sample = sample_saved(out, SAMPLE_PROMPT)  # 8. check the files load and generate
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)
    stats = RunStats(
        size=sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
        t_total=time.perf_counter() - t_start, cpu_total=time.process_time() - cpu_start,
        load_start=load_start, load_end=load_average())
    log(f"saved to {out}: {stats.size / 1e6:.2f} MB; training {trained.seconds:.0f}s, "
        f"total {stats.t_total:.0f}s (CPU time {stats.cpu_total:.0f}s; 1-min load average "
        f"{load_start:.1f} at start, {stats.load_end:.1f} at end)")
    # 9. TRAINING.md
    write_training_md(out, args, corpus, tt, data, (n_params, n_embed), trained, evald, stats,
                      sample, chat_sample)
    return 0


if __name__ == "__main__":
    sys.exit(main())
