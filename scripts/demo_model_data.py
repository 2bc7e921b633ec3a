"""Data preparation for scripts/train_demo_model.py: the stdlib corpus and its train/validation
split, the ChatML examples, the byte-level BPE tokenizer, and the encoded token windows."""

from __future__ import annotations

import ast
import platform
import random
import sysconfig
import textwrap
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
# data


@dataclass
class Corpus:
    """The stdlib sources; every val_every-th file in path order is held out for validation."""

    root: Path
    files: list[tuple[str, str]]
    train_files: list[tuple[str, str]]
    val_files: list[tuple[str, str]]
    train_bytes: int
    val_bytes: int


@dataclass
class TrainedTokenizer:
    tok: Any  # tokenizers.Tokenizer
    fast: Any  # transformers.PreTrainedTokenizerFast wrapping tok
    ids: dict[str, int]  # special token -> id
    vocab_size: int
    seconds: float


@dataclass
class Data:
    """Token streams and their (seq_len + 1)-token windows: x[i] predicts y[i] (shifted by one)."""

    train_ids: Any  # 1-D LongTensor: shuffled documents joined by <|endoftext|>
    val_ids: Any  # 1-D LongTensor: held-out files in path order
    xtr: Any
    ytr: Any
    xva: Any
    yva: Any
    n_chats: int
    chat_tokens: int
    val_target_bytes: int  # UTF-8 bytes covered by yva, for bits per byte


def windows(stream, seq_len: int):
    """Non-overlapping (seq_len + 1)-token windows of a 1-D tensor (the tail is dropped)."""
    n = (len(stream) - 1) // seq_len
    idx = stream[: n * seq_len + 1]
    x = idx[:-1].view(n, seq_len)
    y = idx[1:].view(n, seq_len)
    return x, y


def split_corpus(val_every: int) -> Corpus:
    root, files = stdlib_files()
    train_files = [(p, t) for i, (p, t) in enumerate(files) if i % val_every != 0]
    val_files = [(p, t) for i, (p, t) in enumerate(files) if i % val_every == 0]
    corpus = Corpus(root, files, train_files, val_files,
                    train_bytes=sum(len(t.encode()) for _, t in train_files),
                    val_bytes=sum(len(t.encode()) for _, t in val_files))
    log(f"corpus: {root} (Python {platform.python_version()}): {len(files)} files, "
        f"train {len(train_files)} files / {corpus.train_bytes / 1e6:.2f} MB, "
        f"val {len(val_files)} files / {corpus.val_bytes / 1e6:.2f} MB")
    return corpus


def build_tokenizer(corpus: Corpus, vocab_size: int) -> TrainedTokenizer:
    t0 = time.perf_counter()
    tok = train_tokenizer([t for _, t in corpus.train_files], vocab_size)
    fast = wrap_tokenizer(tok)
    ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
    result = TrainedTokenizer(tok, fast, ids, tok.get_vocab_size(), time.perf_counter() - t0)
    log(f"tokenizer: vocab {result.vocab_size}, specials {ids}, trained in {result.seconds:.1f}s")
    return result


def join_documents(encodings, eot: int) -> list[int]:
    """Token ids of the encoded documents, each followed by <|endoftext|>."""
    out: list[int] = []
    for e in encodings:
        out.extend(e.ids)
        out.append(eot)
    return out


def encode_data(args, corpus: Corpus, tt: TrainedTokenizer) -> Data:
    import torch

    t0 = time.perf_counter()
    tok, eot = tt.tok, tt.ids[EOT]
    docs = [t for _, t in corpus.train_files]
    chats = []
    if not args.no_chat:
        for _, t in corpus.train_files:
            chats.extend(chat_examples(t))
    rng = random.Random(args.seed)
    all_docs = docs + chats
    rng.shuffle(all_docs)
    enc = tok.encode_batch(all_docs, add_special_tokens=False)
    train_ids = torch.tensor(join_documents(enc, eot), dtype=torch.long)
    val_enc = tok.encode_batch([t for _, t in corpus.val_files], add_special_tokens=False)
    val_ids = torch.tensor(join_documents(val_enc, eot), dtype=torch.long)
    xtr, ytr = windows(train_ids, args.seq_len)
    xva, yva = windows(val_ids, args.seq_len)
    chat_tokens = sum(len(e.ids) + 1 for e, d in zip(enc, all_docs) if d.startswith(IM_START))
    code_tokens = max(1, len(train_ids) - chat_tokens)
    log(f"data: {len(train_ids):,} train tokens "
        f"({corpus.train_bytes / code_tokens:.2f} bytes/token on code; "
        f"{len(chats)} chat examples = {chat_tokens:,} tokens), "
        f"{len(val_ids):,} val tokens; {len(xtr)} train / {len(xva)} val windows of "
        f"{args.seq_len}; encoded in {time.perf_counter() - t0:.1f}s")
    val_target_bytes = len(tok.decode(yva.reshape(-1).tolist(), skip_special_tokens=True)
                           .encode())
    return Data(train_ids, val_ids, xtr, ytr, xva, yva, len(chats), chat_tokens,
                val_target_bytes)
