"""The outputs of scripts/train_demo_model.py: the saved HF files, their load-and-generate check,
and TRAINING.md, which records the recipe and the numbers of the run."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path

# Written fresh on every run; removed first so no file of an earlier run (or layout) survives.
SAVED_FILES = ("model.safetensors", "pytorch_model.bin", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "config.json", "generation_config.json")


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class RunStats:
    """Whole-script figures, taken after the files are saved and checked."""

    size: int  # bytes of all files in the output directory
    t_total: float
    cpu_total: float
    load_start: float  # 1-minute load average
    load_end: float


def save(out: Path, model, fast, generation_config: dict) -> None:
    """HF layout: config, weights, tokenizer (+ chat template) and generation config."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in SAVED_FILES:
        (out / stale).unlink(missing_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    # tokenizer_class: the generic name, loadable by transformers 4.x as well as 5.x; the chat
    # template also goes inline for loaders that only read tokenizer_config.json.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["chat_template"] = fast.chat_template
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")


def sample_saved(out: Path, prompt_text: str) -> tuple[str, str]:
    """Greedy plain and chat samples from the saved files, which checks that they load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ltok = AutoTokenizer.from_pretrained(out)
    prompt = ltok(prompt_text, return_tensors="pt")
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
    return sample, chat_sample


def write_training_md(out: Path, args, corpus, tt, data, params: tuple[int, int], trained,
                      evald, stats: RunStats, sample: str, chat_sample: str) -> None:
    """out/TRAINING.md from the run's records (see the dataclasses in train_demo_model.py and
    demo_model_data.py)."""
    note = recipe_md(args, corpus, tt, data, params, trained, evald.n_targets)
    note += results_md(args, tt, data, trained, evald, stats, sample, chat_sample)
    (out / "TRAINING.md").write_text(note)


def recipe_md(args, corpus, tt, data, params: tuple[int, int], trained, n_targets: int) -> str:
    """TRAINING.md up to ## Results: what the model is and how it was made."""
    n_params, n_embed = params
    root, files, train_files, val_files = (corpus.root, corpus.files, corpus.train_files,
                                           corpus.val_files)
    train_bytes, val_bytes = corpus.train_bytes, corpus.val_bytes
    vocab_size, ids = tt.vocab_size, tt.ids
    eot, im_start, im_end = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
    n_train, n_chats, chat_tokens = len(data.train_ids), data.n_chats, data.chat_tokens
    steps_done, stopped_early = trained.steps_done, trained.stopped_early
    tokens_per_step = args.batch_size * args.seq_len
    return f"""# zomni demo model

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
  special tokens `<|endoftext|>` ({ids[eot]}, document separator and pad), `<|im_start|>`
  ({ids[im_start]}), `<|im_end|>` ({ids[im_end]}, eos); ChatML chat template.
- Data: {n_train:,} training tokens: the training files plus {n_chats} ChatML exchanges
  (documented top-level functions: the user asks for the signature + docstring summary, the
  assistant answers with the source in a python code fence) = {chat_tokens:,} tokens.
  Validation: {n_targets:,} target tokens of plain held-out source.
- Model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} KV heads,
  head dim {args.hidden // args.heads}), SwiGLU {args.intermediate}, tied embeddings,
  max positions {args.max_positions}; {n_params:,} parameters ({n_params - n_embed:,}
  non-embedding), fp32.
- Training: {steps_done} steps{" (STOPPED EARLY by the time budget)" if stopped_early else ""}
  of {args.batch_size} x {args.seq_len} tokens ({steps_done * tokens_per_step / n_train:.2f}
  epochs), AdamW (lr {args.lr}, betas 0.9/0.95, weight decay {args.weight_decay}), {args.warmup}
  warmup steps then cosine to {args.min_lr_ratio} x lr, gradient clip {args.grad_clip}, fp32,
  {args.threads} torch threads.

"""


def results_md(args, tt, data, trained, evald, stats: RunStats, sample: str,
               chat_sample: str) -> str:
    """TRAINING.md from ## Results on: losses, periodic evaluations, timings, samples."""
    import torch

    t_tok, steps_done, t_train = tt.seconds, trained.steps_done, trained.seconds
    n_eval = min(args.eval_windows, len(data.xva))  # windows of the periodic evaluation
    tokens_per_step = args.batch_size * args.seq_len
    val_loss, uni_loss, bpb, uni_bpb = evald.val_loss, evald.uni_loss, evald.bpb, evald.uni_bpb
    t_eval = evald.seconds
    size, t_total, cpu_total = stats.size, stats.t_total, stats.cpu_total
    load_start, load_end = stats.load_start, stats.load_end
    hist = "\n".join(f"| {s} | {tl:.3f} | {vl:.3f} |" for s, tl, vl in trained.history)
    return f"""## Results

| | validation loss (nats/token) | perplexity | bits/byte |
| --- | --- | --- | --- |
| unigram baseline (add-one smoothed) | {uni_loss:.3f} | {math.exp(uni_loss):.1f} | {uni_bpb:.3f} |
| this model | {val_loss:.3f} | {math.exp(val_loss):.2f} | {bpb:.3f} |

Periodic evaluation (train = smoothed training loss, val = first {n_eval}
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
