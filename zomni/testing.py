"""Random-weight HF-format models for tests and benchmarks (no hub exists on our machines).

`build_model(path, "qwen3", shape="tiny")` writes config.json, model.safetensors, a byte-level
BPE tokenizer with a chat template, and generation_config.json, exactly as a hub download
would lay them out, so the real loading code is what gets tested.
"""

from __future__ import annotations

import json
from pathlib import Path

ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

SHAPES = {
    # name: hidden, layers, heads, kv_heads, head_dim, intermediate, vocab
    "tiny": (64, 2, 4, 2, 16, 128, 512),
    "small": (512, 8, 8, 4, 64, 1536, 8192),
    "qwen3-0.6b": (1024, 28, 16, 8, 128, 3072, 151936),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. Hello, world!",
    "Große Äpfel, café, naïve, 日本語のテキスト, emoji 🙂🚀, Ελληνικά, русский текст.",
    "import os\nimport sys\n\nclass Engine:\n    def step(self):\n        pass\n",
]


def build_tokenizer(path: Path, vocab_size: int) -> int:
    """Train a small byte-level BPE on a fixed corpus; returns the tokenizer's size.

    Few merges on purpose: multi-byte characters are split across tokens, which is what the
    incremental-detokenizer tests need.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 256 + len(SPECIAL_TOKENS) + 64),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return len(fast)


def build_model(path: str | Path, arch: str = "llama", shape: str = "tiny", seed: int = 0,
                dtype: str = "float32", **overrides) -> Path:
    """Write a random-weight model of `arch` and `shape` to `path`; returns the path."""
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hidden, layers, heads, kv_heads, head_dim, inter, vocab = SHAPES[shape]
    cls_name = ARCHS[arch]
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    build_tokenizer(path, vocab)
    fields = dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=inter,
        vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-6,
        tie_word_embeddings=False, eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        bos_token_id=None, pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
    )
    if arch == "mistral":
        fields["sliding_window"] = None
    fields.update(overrides)
    config = config_cls(**fields)
    config.architectures = [cls_name]
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config)
    # Default init is tiny (std 0.02); widen it so logits have real margins and greedy ties
    # are rare, which keeps token-for-token comparisons meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5 * 1.5)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
    gen = {"eos_token_id": fields["eos_token_id"], "bos_token_id": None}
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path
