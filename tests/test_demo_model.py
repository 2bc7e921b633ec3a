"""The shipped demo model (zomni/demo_model/, built by scripts/train_demo_model.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "zomni" / "demo_model"
FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "TRAINING.md"]
PROMPT = "def fibonacci(n):\n"

SOURCE = '''\
import os


class Engine:
    """Run one step.

    Tabs\tand  runs   of spaces, unicode: café 日本語 🙂, CRLF\r\n and a trailing space. \n"""

    def step(self, batch: list[int] | None = None) -> dict[str, float]:
        if not batch:
            return {}
        total = sum(x ** 2 for x in batch)  # comment
        return {"mean": total / len(batch), 'path': os.sep}
'''


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO)


def test_files_exist_and_fit():
    for name in FILES:
        assert (DEMO / name).is_file(), name
    has_template = (DEMO / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (DEMO / "tokenizer_config.json").read_text())
    assert has_template
    total = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert total <= 25 * 1024 * 1024, total


def test_config_loads():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(DEMO)
    assert config.model_type in ("qwen3", "llama")
    assert config.architectures == ["Qwen3ForCausalLM"] or config.architectures == [
        "LlamaForCausalLM"]
    assert config.max_position_embeddings >= 1024
    assert config.tie_word_embeddings
    gen = json.loads((DEMO / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    assert eos and all(0 <= e < config.vocab_size for e in eos)


def test_tokenizer_round_trips_python(tokenizer):
    import inspect

    texts = [SOURCE, PROMPT, inspect.getsource(json.decoder), "\t\t  x  \n\n\n    "]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # Indentation is cheap: a 4-space-indented line is not spelled out one space at a time.
    assert len(tokenizer.encode("        return x\n", add_special_tokens=False)) <= 5


def test_special_tokens_and_chat_template(tokenizer):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in specials]
    assert all(isinstance(i, int) and i >= 0 for i in ids)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [ids[1]]
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_greedy_continuation_looks_like_python(tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 7e6
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    # An indented body that opens with a docstring, a comment or a statement, and mostly
    # ordinary ASCII words (not noise).
    assert re.match(r"^( {4}|\t)\S", text), repr(text)
    python_like = r'"""|\'\'\'|#|\b(return|if|for|while|raise|import|try|with|assert|pass)\b|\('
    assert re.search(python_like, text), repr(text)
    printable = sum(c.isascii() and (c.isprintable() or c in "\n\t") for c in text)
    assert printable >= 0.9 * len(text), repr(text)
    words = re.findall(r"[A-Za-z_]\w*", text)
    assert len(words) >= 3, repr(text)
