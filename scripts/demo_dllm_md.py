"""TRAINING.md of zomni/demo_dllm_model/, from the records of scripts/train_demo_dllm.py."""

from __future__ import annotations

import math
import platform


def training_md(run, comparison, stats, t_report: float) -> str:
    """`run`: demo_dllm_report.Run; `comparison`: demo_dllm_report.Comparison; `stats`:
    demo_model_report.RunStats."""
    return (intro_md(run) + recipe_md(run, comparison) + results_md(run, comparison)
            + time_md(run, comparison, stats, t_report) + samples_md(run, comparison)
            + NOTES)


# Measured with this script (seed 0, 1500-step schedules stopped at step 800) before the run
# above; the figures are the periodic evaluation's bound on the first 32 validation windows.
NOTES = """
## Notes

- Learning rate and t sampling: at the AR demo's peak lr 3e-3 with independent t the bound
  stayed at the unigram level (6.47 at step 500; an add-one unigram model scores 6.44 on the
  whole validation set): the 1 / p-weighted loss of batches of 8 is too noisy for it. Bound
  at step 800: lr 1e-3 with independent t 5.88, lr 1e-3 stratified 5.63 (the recipe above),
  lr 2e-3 stratified 5.67.
- At the same size and token budget the masked-diffusion model trails the AR model in
  likelihood, as masked-diffusion LMs do at equal compute (MDLM). Likely reasons at this
  scale: it learns from the masked positions only (half of the tokens on average), and it
  reaches every context token through attention, where an AR model reads the previous token
  at its own position.
"""


def intro_md(run) -> str:
    return f"""# zomni demo masked-diffusion LM

A {run.n_params / 1e6:.1f}M-parameter masked-diffusion LM in LLaDA's layout (`LLaDAModelLM`),
trained from scratch on the Python standard library's own sources by
`scripts/train_demo_dllm.py` (seed {run.args.seed}). It is the diffusion counterpart of the AR
demo model (`zomni/demo_model/`, `zomni-demo`): the same corpus, split, tokenizer, training
windows, size and token budget, trained with LLaDA's masked-diffusion objective instead of
next-token prediction. zomni serves it with `workers/models/dllm.py` and decodes it with
`workers/dllm_decoding.py`. It writes Python-looking code; it knows nothing else.

"""


def recipe_md(run, comparison) -> str:
    a, corpus, data, tt = run.args, run.corpus, run.data, run.tt
    tokens_per_step = a.batch_size * (a.seq_len + 1)
    same = ("the same merges as `zomni/demo_model/tokenizer.json`, so both models see the very "
            "same validation tokens" if comparison.same_tokens else
            "NOT the merges of `zomni/demo_model/tokenizer.json` (another stdlib trained that "
            "one): compare the two models in bits/byte only")
    return f"""## Recipe

- Corpus and data: exactly the AR demo's (`scripts/demo_model_data.py`): the `.py` files
  under `{corpus.root}` (Python {platform.python_version()}), every {a.val_every}th file held
  out: train {len(corpus.train_files)} files ({corpus.train_bytes / 1e6:.2f} MB) plus
  {data.n_chats} ChatML exchanges, {len(data.train_ids):,} tokens, validation
  {len(corpus.val_files)} files. Training sequences are the AR run's {a.seq_len + 1}-token
  windows, visited in its seeded order.
- Tokenizer: the AR demo's byte-level BPE (vocab {a.vocab_size}, retrained by the same code:
  {same}), plus the mask token `{tt.tok.id_to_token(run.mask_id)}` (id {run.mask_id}, vocab
  {tt.tok.get_vocab_size()}). `<|endoftext|>` ({tt.ids["<|endoftext|>"]}) separates documents
  and pads, `<|im_end|>` ({tt.ids["<|im_end|>"]}) is eos.
- Model: a Llama-style transformer without a causal mask (LLaDA's `block_type` "llama"):
  hidden {a.hidden}, {a.layers} layers, {a.heads} heads ({a.kv_heads} KV heads, head dim
  {a.hidden // a.heads}), SwiGLU {a.intermediate}, RMSNorm (eps {a.rms_norm_eps}), rotary
  (theta {a.rope_theta:g}), no biases; {run.n_params:,} parameters, the same body as the AR
  demo's. Embeddings are tied to the LM head in training, as the AR demo's; LLaDA's layout has
  an LM head of its own (`model.transformer.ff_out.weight`, `weight_tying` false), so the
  folder stores the tied matrix twice.
- Objective (LLaDA's pretraining): per sequence t ~ U(0, 1) and p = (1 - {a.eps:g}) t +
  {a.eps:g}; each token is replaced by the mask token with probability p; the loss is the
  cross-entropy on the masked positions, each weighted 1 / p, summed and divided by batch x
  length. The batch's t are stratified (t_i = (u + i / B) mod 1, one u per batch: each t_i
  still U(0, 1), as MDLM's low-discrepancy sampler), which lowers the loss's variance.
  {a.random_length_frac:.0%} of the batches are cut to a random length in [1, {a.seq_len + 1}]
  first ({run.trained.random_length_batches} batches in this run).
- Training: {run.trained.steps_done} steps{" (STOPPED EARLY by the time budget)"
                                           if run.trained.stopped_early else ""} of
  {a.batch_size} x {a.seq_len + 1} tokens
  ({run.trained.steps_done * tokens_per_step / len(data.train_ids):.2f} epochs, the AR demo's
  budget), AdamW (lr {a.lr}, betas 0.9/0.95, weight decay {a.weight_decay}), {a.warmup} warmup
  steps then cosine to {a.min_lr_ratio} x lr, gradient clip {a.grad_clip}, fp32,
  {a.threads} torch threads.

"""


def results_md(run, comparison) -> str:
    e, c = run.evald, comparison
    hist = "\n".join(f"| {s} | {tl:.3f} | {vl:.3f} |" for s, tl, vl in run.trained.history)
    n_eval = min(run.args.eval_windows, len(run.data.xva))
    ar_row = f"{c.ar_loss:.3f} | {math.exp(c.ar_loss):.2f} | {c.ar_bpb:.3f}"
    dllm_row = f"{e.bound:.3f} ± {e.stderr:.3f} | <= {math.exp(e.bound):.2f} | <= {e.bpb:.3f}"
    return f"""## Results

Validation: the {e.n_targets:,} target tokens of the held-out files' {len(run.data.xva)}
windows, each window's first token given as context, as the AR demo's evaluation scores them.

| model | validation loss (nats/token) | perplexity | bits/byte |
| --- | --- | --- | --- |
| AR demo (`zomni/demo_model`), exact NLL | {ar_row} |
| this model, masked-diffusion bound on the NLL | {dllm_row} |

The diffusion model's number is an upper bound on its NLL (the negative ELBO), not the NLL
itself; its true NLL is at most this. It is estimated as LLaDA evaluates likelihoods
(eq. 6 of "Large Language Diffusion Models", the lower-variance form): per window and
Monte-Carlo sample, l ~ U{{1..{run.args.seq_len}}} of the targets are masked uniformly at
random and the bound is the mean cross-entropy over those l positions; {e.samples} samples per
window, drawn from a fixed seed (the same masks in every run); ± is the Monte-Carlo standard
error over windows.

Periodic evaluation (train = smoothed training loss, the weighted objective above; val = the
bound on the first {n_eval} validation windows, 2 fixed masks each):

| step | train | val bound |
| --- | --- | --- |
{hist}

Check: the saved folder, loaded by zomni's loader (`workers/loader.py`,
`workers/models/dllm.py`), gives the training model's logits on two partly masked validation
windows to {c.max_logit_diff:.1e} (fp32).

"""


def time_md(run, comparison, stats, t_report: float) -> str:
    import torch

    a, tr = run.args, run.trained
    tokens_per_step = a.batch_size * (a.seq_len + 1)
    return f"""Time: {stats.t_total / 60:.1f} min for the whole script (training {tr.seconds:.0f} s
= {tr.steps_done * tokens_per_step / tr.seconds:,.0f} tokens/s, final evaluation
{run.evald.seconds:.0f} s, loader check + samples + AR evaluation {t_report:.0f} s) on
{platform.machine()} with {a.threads} torch threads, torch {torch.__version__}. The process used
{stats.cpu_total / 60:.1f} CPU-minutes; the 1-minute load average was {stats.load_start:.2f} at
the start and {stats.load_end:.2f} at the end (above {a.threads} means other work shared the
cores and the wall times above are inflated).

Size: {stats.size / 1e6:.2f} MB in all (without this file).

"""


def samples_md(run, comparison) -> str:
    a = run.args
    blocks = []
    for prompt, by_model in comparison.samples.items():
        parts = [f"### `{prompt!r}`\n"]
        for name, text in by_model.items():
            if name.startswith("dLLM threshold"):
                name += f" ({comparison.forwards[prompt]} forwards)"
            parts.append(f"{name}:\n\n```python\n{prompt}{text}\n```\n")
        blocks.append("\n".join(parts))
    return f"""## Samples

{a.gen_length} new tokens per prompt, cut after the first end-of-text / eos token. AR demo:
greedy (transformers `generate`). This model: `workers/dllm_step.generate()` at temperature 0,
blocks of 32, either LLaDA's low-confidence remasking with steps = {a.gen_length} (one token per
step) or Fast-dLLM's threshold decoding (every candidate with confidence >= 0.9, at least one
per step). The prompt is shown before each completion.{one_per_step_md(run, comparison)}

""" + "\n".join(blocks)


def one_per_step_md(run, comparison) -> str:
    """A remark when threshold decoding never committed two tokens in one step: it then
    commits the most confident candidate per step, which is low-confidence remasking."""
    if any(n < run.args.gen_length for n in comparison.forwards.values()):
        return ""
    return """ Here no step of threshold decoding found a
second candidate above the threshold: it took one forward per token, committing the most
confident candidate each time, which is what low-confidence remasking with one token per step
does, so both decodings wrote the same text."""
