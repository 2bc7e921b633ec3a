"""The outputs of scripts/train_demo_dllm.py: the LLaDA-layout folder, its check through zomni's
loader, samples from `dllm_step.generate()`, the AR demo on the same held-out text, TRAINING.md.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from demo_dllm_md import training_md
from demo_model_data import EOT, IM_END, join_documents, log, windows, wrap_tokenizer
from demo_model_report import RunStats
from train_demo_model import evaluate, load_average

PROMPTS = ("def fibonacci(n):\n", "import os\n", "class Stack:\n")
THRESHOLD = 0.9
BLOCK_LENGTH = 32
# Written fresh on every run; removed first so no file of an earlier run survives.
SAVED_FILES = ("model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "config.json",
               "generation_config.json", "TRAINING.md")


@dataclass
class DLLMEval:
    bound: float  # nats per target token, an upper bound on the NLL
    stderr: float  # Monte-Carlo standard error of `bound`
    bpb: float
    n_targets: int
    samples: int  # masks per window
    seconds: float


@dataclass
class Comparison:
    ar_loss: float
    ar_bpb: float
    same_tokens: bool  # the AR demo's tokenizer gives the very same validation tokens
    max_logit_diff: float  # zomni's loader vs the training model
    samples: dict[str, dict[str, str]]  # prompt -> model / decoding -> completion
    forwards: dict[str, int]  # prompt -> forwards of threshold decoding


# --------------------------------------------------------------------------------------------
# the folder


def llada_config(args, vocab_size: int, mask_id: int, ids: dict[str, int]) -> dict:
    """config.json as LLaDA's (GSAI-ML/LLaDA-8B-Base) names its fields."""
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu",
        "alibi": False, "attention_layer_norm": False, "block_type": "llama",
        "d_model": args.hidden, "n_heads": args.heads, "n_kv_heads": args.kv_heads,
        "n_layers": args.layers, "mlp_hidden_size": args.intermediate,
        "mlp_ratio": args.intermediate / args.hidden, "vocab_size": vocab_size,
        "embedding_size": vocab_size, "include_bias": False, "include_qkv_bias": False,
        "layer_norm_type": "rms", "rms_norm_eps": args.rms_norm_eps, "rope": True,
        "rope_full_precision": True, "rope_theta": args.rope_theta,
        "max_sequence_length": args.max_positions, "mask_token_id": mask_id,
        "eos_token_id": ids[IM_END], "pad_token_id": ids[EOT], "bos_token_id": None,
        "scale_logits": False, "weight_tying": False, "input_emb_norm": False,
        "flash_attention": False, "use_cache": False, "torch_dtype": "float32",
    }


def save_folder(args, model, tt, mask_id: int) -> None:
    """config.json, model.safetensors (LLaDA's names), tokenizer with the mask token,
    generation_config.json."""
    from safetensors.torch import save_file

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in SAVED_FILES:
        (out / stale).unlink(missing_ok=True)
    save_file(model.export_tensors(), out / "model.safetensors", metadata={"format": "pt"})
    config = llada_config(args, tt.tok.get_vocab_size(), mask_id, tt.ids)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    fast = wrap_tokenizer(tt.tok)
    fast.mask_token = tt.tok.id_to_token(mask_id)
    fast.save_pretrained(out)
    tc_path = out / "tokenizer_config.json"  # as the AR demo's: loadable by transformers 4.x
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["chat_template"] = fast.chat_template
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    gen = {"bos_token_id": None, "eos_token_id": [tt.ids[IM_END], tt.ids[EOT]],
           "pad_token_id": tt.ids[EOT], "mask_token_id": mask_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def check_loader(out: Path, model, x: torch.Tensor):
    """zomni's LLaDAModelLM from the folder; its logits on the (partly masked) batch x [2, L]
    must equal the training model's (fp32). Returns (zomni's model, the largest difference)."""
    from zomni.workers.dllm_attention import Segment
    from zomni.workers.loader import load_model

    ours, _ = load_model(out, torch.float32, "cpu")
    with torch.no_grad():
        expected = model.eval()(x)
        n = x.shape[1]
        got = ours.compute_logits(ours(x.reshape(-1), [Segment(0, n), Segment(0, n)]))
    diff = float((got.view_as(expected) - expected).abs().max())
    log(f"zomni loader: logits max |diff| {diff:.2e} against the training model")
    if not diff < 1e-4:
        raise RuntimeError(f"the saved folder's logits differ from the model's by {diff}")
    return ours, diff


# --------------------------------------------------------------------------------------------
# samples and the AR demo


def until_eos(ids: list[int], eos: set[int]) -> list[int]:
    """ids up to and including the first EOS."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def dllm_samples(model, fast, gen_length: int, eos: set[int]):
    """Per prompt: greedy low-confidence remasking and threshold decoding through
    `dllm_step.generate()`, and how many forwards the threshold took."""
    from zomni.workers.dllm_decoding import DecodingParams
    from zomni.workers.dllm_step import generate

    forwards = [0]
    hook = model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    samples, counts = {}, {}
    for prompt in PROMPTS:
        ids = fast.encode(prompt, add_special_tokens=False)
        out = {}
        for name, threshold in (("low_confidence", None), (f"threshold {THRESHOLD}", THRESHOLD)):
            # LLaDA's low-confidence remasking (the default) at temperature 0
            params = DecodingParams(gen_length=gen_length, block_length=BLOCK_LENGTH,
                                    steps=gen_length, temperature=0.0, threshold=threshold)
            forwards[0] = 0
            gen = generate(model, [ids], params)[0]
            out[f"dLLM {name}"] = fast.decode(until_eos(gen, eos), skip_special_tokens=False)
            if threshold is not None:
                counts[prompt] = forwards[0]
        samples[prompt] = out
    hook.remove()
    return samples, counts


def ar_evaluation(ar_dir: Path, corpus, data, tt, batch_size: int):
    """(AR demo's validation loss, its bits/byte, same tokens?) on the held-out files, scored
    as scripts/train_demo_model.py scores them."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ar_tok = Tokenizer.from_file(str(ar_dir / "tokenizer.json"))
    same = json.loads(ar_tok.to_str())["model"] == json.loads(tt.tok.to_str())["model"]
    xva, yva, n_bytes = data.xva, data.yva, data.val_target_bytes
    if not same:  # another stdlib trained that tokenizer: score its own tokens (bits/byte hold)
        enc = ar_tok.encode_batch([t for _, t in corpus.val_files], add_special_tokens=False)
        ids = torch.tensor(join_documents(enc, ar_tok.token_to_id(EOT)), dtype=torch.long)
        xva, yva = windows(ids, data.xva.shape[1])
        n_bytes = len(ar_tok.decode(yva.reshape(-1).tolist(), skip_special_tokens=True).encode())
    model = AutoModelForCausalLM.from_pretrained(ar_dir, dtype=torch.float32).eval()
    loss = evaluate(model, xva, yva, batch_size)
    bpb = loss * yva.numel() / math.log(2) / n_bytes
    log(f"AR demo {ar_dir}: val loss {loss:.4f} ({bpb:.3f} bits/byte); "
        f"same validation tokens: {same}")
    return model, loss, bpb, same


def ar_samples(model, fast, gen_length: int, eos: set[int]) -> dict[str, str]:
    out = {}
    for prompt in PROMPTS:
        ids = torch.tensor([fast.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=gen_length, do_sample=False)
        out[prompt] = fast.decode(until_eos(seq[0, ids.shape[1]:].tolist(), eos),
                                  skip_special_tokens=False)
    return out


@dataclass
class Run:
    """What train_demo_dllm.py hands over: the trained model and the run's records."""

    args: object
    model: object  # train_demo_dllm.DemoDLLM
    corpus: object
    tt: object
    data: object
    mask_id: int
    n_params: int
    trained: object  # train_demo_dllm.TrainResult
    evald: DLLMEval
    check_batch: torch.Tensor  # [2, L] validation windows, partly masked
    start: tuple[float, float, float]  # perf_counter, process_time, load average


def compare_and_report(run: Run) -> None:
    """Check the saved folder, sample both models, score the AR demo, write TRAINING.md."""
    args, tt = run.args, run.tt
    t0 = time.perf_counter()
    ours, diff = check_loader(args.out, run.model, run.check_batch)
    fast, eos = wrap_tokenizer(tt.tok), {tt.ids[EOT], tt.ids[IM_END]}
    samples, forwards = dllm_samples(ours, fast, args.gen_length, eos)
    ar, ar_loss, ar_bpb, same = ar_evaluation(args.ar_model, run.corpus, run.data, tt,
                                              args.batch_size)
    for prompt, text in ar_samples(ar, fast, args.gen_length, eos).items():
        samples[prompt] = {"AR demo greedy": text, **samples[prompt]}
        log(f"--- {prompt!r}\n" + "\n".join(f"[{k}]\n{v}" for k, v in samples[prompt].items()))
    comparison = Comparison(ar_loss, ar_bpb, same, diff, samples, forwards)
    t_report = time.perf_counter() - t0
    for f in args.out.iterdir():
        if f.is_file():
            f.chmod(0o644)
    t_start, cpu_start, load_start = run.start
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    stats = RunStats(size=size, t_total=time.perf_counter() - t_start,
                     cpu_total=time.process_time() - cpu_start, load_start=load_start,
                     load_end=load_average())
    md = args.out / "TRAINING.md"
    md.write_text(training_md(run, comparison, stats, t_report))
    md.chmod(0o644)
    log(f"saved to {args.out}: {stats.size / 1e6:.2f} MB (+ TRAINING.md); training "
        f"{run.trained.seconds:.0f}s, total {stats.t_total:.0f}s (CPU {stats.cpu_total:.0f}s; "
        f"1-min load average {load_start:.2f} at start, {stats.load_end:.2f} at end)")
