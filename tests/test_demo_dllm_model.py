"""The shipped demo masked-diffusion LM (zomni/demo_dllm_model/, built by
scripts/train_demo_dllm.py): its LLaDA folder, our forward against transformers' Llama run
without a causal mask on the same weights (`dllm_reference`), and greedy decoding.

Tolerance: logits allclose with atol 1e-4 (fp32), as tests/test_dllm_models.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from dllm_reference import RefModel

from zomni.proto import ModelKind
from zomni.proto.model_info import model_kind, read_model_info
from zomni.workers.dllm_attention import Segment
from zomni.workers.dllm_decoding import DecodingParams
from zomni.workers.dllm_step import generate
from zomni.workers.loader import load_model

DEMO = Path(__file__).resolve().parent.parent / "zomni" / "demo_dllm_model"
FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "TRAINING.md"]
PROMPT = "def fibonacci(n):\n"
MASK = "<|mdm_mask|>"
ATOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def model():
    return load_model(DEMO, torch.float32, "cpu")[0]


def test_files_exist_and_fit():
    for name in FILES:
        assert (DEMO / name).is_file(), name
    total = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert total <= 25 * 1024 * 1024, total


def test_llada_config_and_mask_token(tokenizer):
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["model_type"] == "llada" and cfg["architectures"] == ["LLaDAModelLM"]
    mask = cfg["mask_token_id"]
    assert tokenizer.convert_tokens_to_ids(MASK) == mask == tokenizer.mask_token_id
    assert tokenizer.encode(MASK, add_special_tokens=False) == [mask]
    assert cfg["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert cfg["pad_token_id"] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert model_kind(DEMO) == ModelKind.DLLM
    info = read_model_info(str(DEMO))
    assert info.architecture == "LLaDAModelLM" and info.details.mask_token_id == mask
    assert info.details.vocab_size == len(tokenizer) == cfg["embedding_size"]


def test_parameter_count(model):
    # the AR demo's size (embeddings tied in training, so the head is not counted twice)
    t = model.model.transformer
    n = sum(p.numel() for p in model.parameters()) - t.ff_out.weight.numel()
    assert 3e6 < n < 6e6, n


def test_logits_match_bidirectional_reference(model, tokenizer):
    ids = tokenizer.encode(PROMPT + "    return n\n", add_special_tokens=False)
    x = torch.tensor(ids + [tokenizer.mask_token_id] * 8)
    with torch.no_grad():
        ours = model.compute_logits(model(x, [Segment(0, len(x))]))
    ref = RefModel(DEMO)
    expected = ref.raw_logits(x[None])[0]
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    causal = ref.raw_logits(x[None], causal=True)[0]
    assert (causal[:-1] - expected[:-1]).abs().amax(-1).min() > 1e-2  # it is bidirectional


def test_greedy_decoding_looks_like_python(model, tokenizer):
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    params = DecodingParams(gen_length=32, block_length=32, steps=32)
    out = generate(model, [ids], params)[0]
    assert len(out) == 32 and tokenizer.mask_token_id not in out
    assert len(set(out)) >= 4, out  # not one token repeated
    text = tokenizer.decode(out, skip_special_tokens=True)
    assert re.match(r"^( {4}|\t)+\S", text), repr(text)  # an indented body
    printable = sum(c.isascii() and (c.isprintable() or c in "\n\t") for c in text)
    assert printable >= 0.9 * len(text), repr(text)
    assert len(re.findall(r"[A-Za-z_]\w*", text)) >= 3, repr(text)
    python_like = r'"""|\'\'\'|#|\b(return|if|for|while|raise|import|def|self|in|not)\b|\(|:'
    assert re.search(python_like, text), repr(text)
