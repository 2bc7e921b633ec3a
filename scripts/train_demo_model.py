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
import ast
import json
import math
import os
import platform
import random
import sys
import sysconfig
import textwrap
import time
import tokenize
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOT, IM_START, IM_END = SPECIAL_TOKENS
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PRETOKENIZE_REGEX = (
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\n+|[^\S\n]+(?!\S)|[^\S\n]+"
)
SAMPLE_PROMPT = "def fibonacci(n):\n"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "zomni" / "demo_model"

# Directories (any path component) that are not library source.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                 "lib2to3_tests"}
# Generated data files: huge literal tables that teach nothing about Python.
EXCLUDED_FILES = {"pydoc_data/topics.py"}
GENERATED_MARKERS = ("generated from 'MAPPINGS/", "Python Character Mapping Codec generated")


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# corpus


def stdlib_files() -> tuple[Path, list[tuple[str, str]]]:
    """(stdlib root, sorted [(relative path, text)]) of the stdlib's library sources."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    out = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        parts = rel.parts[:-1]
        if any(p in EXCLUDED_DIRS or p.startswith("test") for p in parts):
            continue
        if rel.as_posix() in EXCLUDED_FILES or rel.name.startswith("test_"):
            continue
        try:
            with tokenize.open(path) as f:  # honours PEP 263 coding cookies
                text = f.read()
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        head = text[:2000]
        if any(m in head for m in GENERATED_MARKERS):
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if text.strip():
            out.append((rel.as_posix(), text))
    return root, out


def chat_examples(text: str, max_chars: int = 1500) -> list[str]:
    """ChatML exchanges built from the documented top-level functions of one source file."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        summary = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        src = textwrap.dedent("".join(lines[start:node.end_lineno])).rstrip() + "\n"
        if len(src) > max_chars or len(summary) > 300:
            continue
        args = ast.unparse(node.args)
        request = f"Write a Python function `{node.name}({args})`: {summary}"
        # The answer is fenced, as chat models write code; it also keeps a bare "def f(x):\n"
        # prompt (no chat markup) from looking like the start of a chat answer, which would
        # teach completions to stop with <|im_end|> after a line or two.
        answer = f"```python\n{src}```"
        out.append(f"{IM_START}user\n{request}{IM_END}\n{IM_START}assistant\n{answer}{IM_END}\n")
    return out


# --------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level BPE (every byte sequence round-trips exactly) behind a GPT-2-like split in
    # which newlines are always pieces of their own: "):\n    return" -> "):", "\n", "   ",
    # " return". With GPT-2's own split the newline would merge with the indentation after it,
    # so a prompt ending in "\n" (like "def fibonacci(n):\n") would end on a token the model
    # only ever saw before unindented lines.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=EOT,
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,  # decode(encode(src)) == src, byte for byte
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


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


def windows(stream, seq_len: int):
    """Non-overlapping (seq_len + 1)-token windows of a 1-D tensor (the tail is dropped)."""
    n = (len(stream) - 1) // seq_len
    idx = stream[: n * seq_len + 1]
    x = idx[:-1].view(n, seq_len)
    y = idx[1:].view(n, seq_len)
    return x, y


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--val-every", type=int, default=25,
                    help="hold out every N-th file (sorted by path) for validation")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--max-positions", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1500,
                    help="optimizer steps (the run is defined by steps, not by time)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=75)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-windows", type=int, default=32,
                    help="validation windows used for the periodic (not the final) evaluation")
    ap.add_argument("--time-budget", type=float, default=17 * 60,
                    help="safety stop in seconds for the training loop; a run cut short by it "
                         "is reported as such (and is not the deterministic run)")
    ap.add_argument("--no-chat", action="store_true", help="skip the ChatML examples")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    cpu_start = time.process_time()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    # Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads
    # starve everyone (measured 2-4x slower steps under load); numerics are unaffected.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # 1. corpus --------------------------------------------------------------------------
    root, files = stdlib_files()
    train_files = [(p, t) for i, (p, t) in enumerate(files) if i % args.val_every != 0]
    val_files = [(p, t) for i, (p, t) in enumerate(files) if i % args.val_every == 0]
    train_bytes = sum(len(t.encode()) for _, t in train_files)
    val_bytes = sum(len(t.encode()) for _, t in val_files)
    log(f"corpus: {root} (Python {platform.python_version()}): {len(files)} files, "
        f"train {len(train_files)} files / {train_bytes / 1e6:.2f} MB, "
        f"val {len(val_files)} files / {val_bytes / 1e6:.2f} MB")

    # 2. tokenizer -------------------------------------------------------------------------
    t0 = time.perf_counter()
    tok = train_tokenizer([t for _, t in train_files], args.vocab_size)
    fast = wrap_tokenizer(tok)
    ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
    vocab_size = tok.get_vocab_size()
    t_tok = time.perf_counter() - t0
    log(f"tokenizer: vocab {vocab_size}, specials {ids}, trained in {t_tok:.1f}s")

    # 3. data ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    docs = [t for _, t in train_files]
    chats = []
    if not args.no_chat:
        for _, t in train_files:
            chats.extend(chat_examples(t))
    rng = random.Random(args.seed)
    all_docs = docs + chats
    rng.shuffle(all_docs)
    enc = tok.encode_batch(all_docs, add_special_tokens=False)
    train_list: list[int] = []
    for e in enc:
        train_list.extend(e.ids)
        train_list.append(ids[EOT])
    train_ids = torch.tensor(train_list, dtype=torch.long)
    val_list: list[int] = []
    for e in tok.encode_batch([t for _, t in val_files], add_special_tokens=False):
        val_list.extend(e.ids)
        val_list.append(ids[EOT])
    val_ids = torch.tensor(val_list, dtype=torch.long)
    xtr, ytr = windows(train_ids, args.seq_len)
    xva, yva = windows(val_ids, args.seq_len)
    chat_tokens = sum(len(e.ids) + 1 for e, d in zip(enc, all_docs) if d.startswith(IM_START))
    code_tokens = max(1, len(train_ids) - chat_tokens)
    log(f"data: {len(train_ids):,} train tokens "
        f"({train_bytes / code_tokens:.2f} bytes/token on code; "
        f"{len(chats)} chat examples = {chat_tokens:,} tokens), "
        f"{len(val_ids):,} val tokens; {len(xtr)} train / {len(xva)} val windows of "
        f"{args.seq_len}; encoded in {time.perf_counter() - t0:.1f}s")
    # bytes covered by the validation targets, for bits per byte
    val_target_bytes = len(tok.decode(yva.reshape(-1).tolist(), skip_special_tokens=True)
                           .encode())

    # 4. model ----------------------------------------------------------------------------
    model = build_model(args, vocab_size, ids)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    log(f"model: Qwen3 hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
        f"({args.kv_heads} kv), ffn {args.intermediate}: {n_params:,} params "
        f"({n_params - n_embed:,} non-embedding), tied embeddings")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(xtr), generator=gen)
    pos = 0
    epochs = 1
    tokens_per_step = args.batch_size * args.seq_len
    log(f"training: {args.steps} steps x {tokens_per_step} tokens = "
        f"{args.steps * tokens_per_step / len(train_ids):.2f} epochs")

    # 5. train ----------------------------------------------------------------------------
    model.train()
    t_train0 = time.perf_counter()
    history = []
    smooth = None
    stopped_early = False
    step = 0
    for step in range(args.steps):
        if pos + args.batch_size > len(order):
            order = torch.randperm(len(xtr), generator=gen)
            pos = 0
            epochs += 1
        b = order[pos:pos + args.batch_size]
        pos += args.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        logits = model(input_ids=xtr[b], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ytr[b].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        lv = loss.item()
        smooth = lv if smooth is None else 0.95 * smooth + 0.05 * lv
        elapsed = time.perf_counter() - t_train0
        done = step + 1
        if done % 25 == 0 or done == 1:
            log(f"step {done:5d}/{args.steps}  loss {lv:.3f} (avg {smooth:.3f})  "
                f"lr {lr_at(step, args):.2e}  {elapsed:6.0f}s  "
                f"{done * tokens_per_step / elapsed:,.0f} tok/s")
        if done % args.eval_every == 0 and done < args.steps:
            n = min(args.eval_windows, len(xva))
            vl = evaluate(model, xva[:n], yva[:n], args.batch_size)
            history.append((done, smooth, vl))
            log(f"  eval @ {done}: train {smooth:.3f}  val {vl:.3f} (first {n} windows)")
        if elapsed > args.time_budget and done < args.steps:
            log(f"WARNING: time budget {args.time_budget:.0f}s exceeded at step {done}; "
                "stopping early (this run is not the deterministic full run)")
            stopped_early = True
            break
    steps_done = step + 1
    t_train = time.perf_counter() - t_train0

    # 6. evaluate ------------------------------------------------------------------------
    t0 = time.perf_counter()
    val_loss = evaluate(model, xva, yva, args.batch_size)
    uni_loss = unigram_loss(train_ids, yva, vocab_size)
    n_targets = yva.numel()
    bpb = val_loss * n_targets / math.log(2) / val_target_bytes
    uni_bpb = uni_loss * n_targets / math.log(2) / val_target_bytes
    t_eval = time.perf_counter() - t0
    log(f"final: val loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f}, {bpb:.3f} bits/byte)  "
        f"unigram {uni_loss:.4f} (ppl {math.exp(uni_loss):.2f}, {uni_bpb:.3f} bits/byte)  "
        f"on {n_targets:,} val tokens; eval {t_eval:.1f}s")

    # 7. save ------------------------------------------------------------------------------
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "pytorch_model.bin", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                  "config.json", "generation_config.json"):
        (out / stale).unlink(missing_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    # tokenizer_class: the generic name, loadable by transformers 4.x as well as 5.x; the chat
    # template also goes inline for loaders that only read tokenizer_config.json.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["chat_template"] = CHAT_TEMPLATE
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    gen_cfg = {"bos_token_id": None, "eos_token_id": [ids[IM_END], ids[EOT]],
               "pad_token_id": ids[EOT], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")

    # 8. check the saved files load and generate --------------------------------------------
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ltok = AutoTokenizer.from_pretrained(out)
    prompt = ltok(SAMPLE_PROMPT, return_tensors="pt")
    with torch.no_grad():
        seq = loaded.generate(**prompt, max_new_tokens=80, do_sample=False)
    sample = ltok.decode(seq[0], skip_special_tokens=False)
    chat_prompt = ltok.apply_chat_template(
        [{"role": "user", "content": "Write a Python function `is_even(n)`: "
                                     "Return True if n is even."}],
        add_generation_prompt=True, tokenize=False)
    with torch.no_grad():
        cseq = loaded.generate(**ltok(chat_prompt, return_tensors="pt", add_special_tokens=False),
                               max_new_tokens=80, do_sample=False)
    chat_sample = ltok.decode(cseq[0], skip_special_tokens=False)
    log("sample:\n" + sample)
    log("chat sample:\n" + chat_sample)

    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    t_total = time.perf_counter() - t_start
    cpu_total = time.process_time() - cpu_start
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log(f"saved to {out}: {size / 1e6:.2f} MB; training {t_train:.0f}s, total {t_total:.0f}s "
        f"(CPU time {cpu_total:.0f}s; 1-min load average {load_start:.1f} at start, "
        f"{load_end:.1f} at end)")

    # 9. TRAINING.md ------------------------------------------------------------------------
    hist = "\n".join(f"| {s} | {tl:.3f} | {vl:.3f} |" for s, tl, vl in history)
    note = f"""# zomni demo model

A {n_params / 1e6:.1f}M-parameter Qwen3-architecture causal LM trained from scratch on the Python
standard library's own sources by `scripts/train_demo_model.py` (seed {args.seed}). It is what
`zomni serve` loads when no `--model` is given. It writes Python-looking code; it knows nothing
else and should not be trusted with anything.

## Recipe

- Corpus: `.py` files under `{root}` (Python {platform.python_version()}), sorted by path;
  tests, site-packages and generated tables excluded: {len(files)} files. Every
  {args.val_every}th file is held out: train {len(train_files)} files ({train_bytes / 1e6:.2f} MB),
  validation {len(val_files)} files ({val_bytes / 1e6:.2f} MB). Another Python version has another
  stdlib, so rerunning the script there gives a (slightly) different model.
- Tokenizer: byte-level BPE (tokenizers), vocab {vocab_size}, trained on the training files only;
  special tokens `<|endoftext|>` ({ids[EOT]}, document separator and pad), `<|im_start|>`
  ({ids[IM_START]}), `<|im_end|>` ({ids[IM_END]}, eos); ChatML chat template.
- Data: {len(train_ids):,} training tokens: the training files plus {len(chats)} ChatML exchanges
  (documented top-level functions: the user asks for the signature + docstring summary, the
  assistant answers with the source in a python code fence) = {chat_tokens:,} tokens.
  Validation: {n_targets:,} target tokens of plain held-out source.
- Model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} KV heads,
  head dim {args.hidden // args.heads}), SwiGLU {args.intermediate}, tied embeddings,
  max positions {args.max_positions}; {n_params:,} parameters ({n_params - n_embed:,}
  non-embedding), fp32.
- Training: {steps_done} steps{" (STOPPED EARLY by the time budget)" if stopped_early else ""}
  of {args.batch_size} x {args.seq_len} tokens ({steps_done * tokens_per_step / len(train_ids):.2f}
  epochs), AdamW (lr {args.lr}, betas 0.9/0.95, weight decay {args.weight_decay}), {args.warmup}
  warmup steps then cosine to {args.min_lr_ratio} x lr, gradient clip {args.grad_clip}, fp32,
  {args.threads} torch threads.

## Results

| | validation loss (nats/token) | perplexity | bits/byte |
| --- | --- | --- | --- |
| unigram baseline (add-one smoothed) | {uni_loss:.3f} | {math.exp(uni_loss):.1f} | {uni_bpb:.3f} |
| this model | {val_loss:.3f} | {math.exp(val_loss):.2f} | {bpb:.3f} |

Periodic evaluation (train = smoothed training loss, val = first {min(args.eval_windows, len(xva))}
validation windows):

| step | train | val |
| --- | --- | --- |
{hist}

Time: {t_total / 60:.1f} min for the whole script (tokenizer {t_tok:.0f} s, training {t_train:.0f} s
= {steps_done * tokens_per_step / t_train:,.0f} tokens/s, final evaluation {t_eval:.0f} s) on
{platform.machine()} with {args.threads} torch threads, torch {torch.__version__}.
The process used {cpu_total / 60:.1f} CPU-minutes; the 1-minute load average was
{load_start:.1f} at the start and {load_end:.1f} at the end (above {args.threads} means other work
shared the cores and the wall times above are inflated).

Size: {size / 1e6:.2f} MB in all.

## Sample

Greedy continuation of `"def fibonacci(n):\\n"` (80 new tokens, transformers `generate`):

```python
{sample}
```

Chat (greedy, 80 new tokens):

````
{chat_sample}
````
"""
    (out / "TRAINING.md").write_text(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
