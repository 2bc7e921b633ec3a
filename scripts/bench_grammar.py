#!/usr/bin/env python3
"""Grammar engines for structured outputs, measured side by side: llguidance against xgrammar.

    python scripts/bench_grammar.py                       # both engines, vocab 8192 and 151936
    python scripts/bench_grammar.py --engines xgrammar --vocabs 8192 --rounds 1

Needs `llguidance`, `xgrammar`, `tokenizers`, `transformers`, `torch` and `jsonschema`; it does
not import zomni. Tokenizers are byte-level BPEs trained on this machine's Python standard
library and torch sources (no hub); each is built once and cached under --cache-dir. A trained
vocab can stop short of the asked size; the engines are then told the asked size (as a Qwen model's
151936 rows exceed its tokenizer's 151669 tokens) and the rows past the tokenizer stay masked.

Per engine and vocab, with --threads CPU threads everywhere:

    tokenizer   building the engine's tokenizer info from the HF fast tokenizer
    compile     a grammar for each of four kinds (below): cold (fresh compiler, median of
                --compile-reps) and second (same compiler; xgrammar's cache, llguidance has
                none and recompiles), then the first mask of a fresh matcher
    mask        one bitmask fill for a batch of --batch matchers with the engine's batch API,
                per step, median and p99 over --rounds x --steps steps; each matcher has its
                own seeded RNG and samples a valid token from its row, so the batch holds
                --batch different states; a matcher that stops is recorded and reset
    accept      feeding the 16 sampled tokens back, per step
    apply       masking [batch, V] float32 logits with the engine's apply function, and with
                torch masked_fill from the unpacked bitmask as a common baseline

Five batches: 16 x one kind for each kind, and "mixed" (4 each of schema, json_object, regex,
lark). json_object is the schema {"type": "object"} in both (xgrammar strict_mode=False,
so extra properties are allowed). Every finished schema output is checked with json.loads +
jsonschema, every json_object output with json.loads, every regex output with `regex.fullmatch`
(the `regex` package, a transformers dependency, has current Unicode tables: llguidance's regex
`\\d` is Unicode-aware as in Rust and emits digits newer than Python 3.11's `re` knows; xgrammar's
`\\d` is ASCII; in JSON-schema patterns both are ASCII). JSON whitespace is
compact in both engines (xgrammar any_whitespace=False, llguidance whitespace_flexible=False):
a sampler walking flexible whitespace rarely finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

STDLIB = Path("/root/.pyenv/versions/3.11.7/lib/python3.11")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS = "<|im_end|>"

# A tool call's parameters: nested objects, an array of objects, enums, required fields,
# string patterns and length bounds.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["search_flights", "book_hotel", "get_weather"]},
        "arguments": {
            "type": "object",
            "properties": {
                "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "date": {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"},
                "passengers": {
                    "type": "array", "minItems": 1, "maxItems": 4,
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "minLength": 1, "maxLength": 24},
                            "age": {"type": "integer", "minimum": 0, "maximum": 120},
                            "seat": {"type": "string", "enum": ["window", "aisle", "middle"]},
                        },
                        "required": ["name", "age"],
                        "additionalProperties": False,
                    },
                },
                "cabin": {"enum": ["economy", "premium", "business", "first"]},
                "flexible": {"type": "boolean"},
                "max_price": {"type": "number"},
            },
            "required": ["origin", "destination", "date", "passengers"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
REGEX = (r"(19|20)\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d:[0-5]\d"
         r"(\.\d{1,6})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)")
# The same arithmetic grammar in each engine's native syntax.
LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | NAME | "(" expr ")"
NUMBER: /[0-9]{1,6}/
NAME: /[a-z_][a-z0-9_]{0,11}/
"""
EBNF = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | name | "(" expr ")"
number ::= [0-9]{1,6}
name ::= [a-z_] [a-z0-9_]{0,11}
"""
JSON_OBJECT = {"type": "object"}  # OpenAI's response_format json_object: any JSON object
KINDS = ["schema", "json_object", "regex", "lark"]


def build_tokenizer(vocab: int, cache_dir: Path):
    """A byte-level BPE of up to `vocab` tokens trained on Python sources, cached on disk."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = cache_dir / f"bpe-stdlib-torch{torch.__version__}-{vocab}"
    if not (path / "tokenizer.json").exists():
        # The stdlib alone (31 MB) stops at ~123k tokens; torch's own sources (46 MB) add the rest.
        files = sorted(str(p) for p in STDLIB.rglob("*.py") if "site-packages" not in p.parts)
        files += sorted(str(p) for p in Path(torch.__file__).parent.rglob("*.py"))
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=SPECIAL_TOKENS, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_utf8_texts(files), trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS,
                                       pad_token="<|endoftext|>")
        fast.save_pretrained(path)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def _utf8_texts(files: list[str]):
    for f in files:
        try:
            yield Path(f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib test files are Latin-1 on purpose


class Llguidance:
    """llguidance: no compiler object and no compile cache; a matcher is built per grammar."""

    name = "llguidance"

    def __init__(self, hf_tok, vocab: int, threads: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch
        self.llg, self.lt, self.vocab = llguidance, llguidance.torch, vocab
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab)
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def new_compiler(self):
        return None

    def compile(self, compiler, kind: str) -> str:
        """The grammar text, checked by building a matcher (the costly part, so it counts)."""
        M = self.llg.LLMatcher
        no_ws = {"whitespace_flexible": False}
        grammar = {"schema": lambda: M.grammar_from_json_schema(SCHEMA, defaults=no_ws),
                   "json_object": lambda: M.grammar_from_json_schema(JSON_OBJECT, defaults=no_ws),
                   "regex": lambda: M.grammar_from_regex(REGEX),
                   "lark": lambda: M.grammar_from_lark(LARK)}[kind]()
        self.matcher(grammar)
        return grammar

    def matcher(self, grammar: str):
        # One LLMatcher per request, as a server would build it: nothing shared between them.
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def allocate(self, batch: int):
        return self.lt.allocate_token_bitmask(batch, self.vocab)

    def fill(self, matchers, bitmask):
        self.lt.fill_next_token_bitmask_par(
            self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matcher, token: int):
        assert matcher.consume_token(token), matcher.get_error()

    def stopped(self, matcher) -> bool:
        return matcher.is_stopped()

    def apply(self, logits, bitmask):
        self.lt.apply_token_bitmask_inplace(logits, bitmask)


class Xgrammar:
    """xgrammar: a GrammarCompiler per tokenizer, with a compile cache."""

    name = "xgrammar"

    def __init__(self, hf_tok, vocab: int, threads: int):
        import xgrammar
        self.xgr, self.vocab, self.threads = xgrammar, vocab, threads
        self.tokenizer = xgrammar.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab)
        self.batcher = xgrammar.BatchGrammarMatcher(max_threads=threads)

    def new_compiler(self):
        return self.xgr.GrammarCompiler(self.tokenizer, max_threads=self.threads)

    def compile(self, compiler, kind: str):
        if kind == "schema":
            return compiler.compile_json_schema(SCHEMA, any_whitespace=False)
        if kind == "json_object":
            return compiler.compile_json_schema(JSON_OBJECT, any_whitespace=False,
                                                strict_mode=False)
        if kind == "regex":
            return compiler.compile_regex(REGEX)
        return compiler.compile_grammar(EBNF)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def allocate(self, batch: int):
        return self.xgr.allocate_token_bitmask(batch, self.vocab)

    def fill(self, matchers, bitmask):
        self.batcher.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher, token: int):
        assert matcher.accept_token(token), token

    def stopped(self, matcher) -> bool:
        return matcher.is_terminated()

    def apply(self, logits, bitmask):
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


ENGINES = {"llguidance": Llguidance, "xgrammar": Xgrammar}


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def ms(xs) -> str:
    return f"{statistics.median(xs) * 1e3:.3f}"


def p99(xs) -> float:
    return float(np.percentile(np.asarray(xs), 99))


def allowed_tokens(row, vocab: int) -> np.ndarray:
    """Token ids whose bit is set: bit j of int32 word i is token 32*i + j (little-endian)."""
    bits = np.unpackbits(row.numpy().view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def bench_compile(engine, reps: int) -> dict:
    engine.compile(engine.new_compiler(), "regex")  # one-time initialisation, not per grammar
    rows = {}
    for kind in KINDS:
        cold, second, first_mask = [], [], []
        for _ in range(reps):
            compiler = engine.new_compiler()
            compiled, t = timed(engine.compile, compiler, kind)
            cold.append(t)
            second.append(timed(engine.compile, compiler, kind)[1])
            bitmask = engine.allocate(1)
            matcher = engine.matcher(compiled)
            first_mask.append(timed(engine.fill, [matcher], bitmask)[1])
        rows[kind] = {"cold_ms": ms(cold), "second_ms": ms(second),
                      "first_mask_ms": ms(first_mask)}
    return rows


def run_batch(engine, hf_tok, kinds: list[str], steps: int, seed: int, results: dict) -> tuple:
    """`steps` sampling steps of one batch; returns per-step fill and accept seconds."""
    eos = hf_tok.convert_tokens_to_ids(EOS)
    compiler = engine.new_compiler()
    compiled = {k: engine.compile(compiler, k) for k in set(kinds)}
    matchers = [engine.matcher(compiled[k]) for k in kinds]
    rngs = [np.random.default_rng([seed, i]) for i in range(len(kinds))]
    tokens = [[] for _ in kinds]
    bitmask = engine.allocate(len(kinds))
    fill_s, accept_s = [], []
    for _ in range(steps):
        fill_s.append(timed(engine.fill, matchers, bitmask)[1])
        picks = []
        for i, rng in enumerate(rngs):
            ids = allowed_tokens(bitmask[i], engine.vocab)
            # Stop with probability 1/2 whenever the grammar allows it, so outputs finish.
            pick = eos if eos in ids and (len(ids) == 1 or rng.random() < 0.5) else \
                int(rng.choice(ids[ids != eos]))
            picks.append(pick)
        t = time.perf_counter()
        for m, pick in zip(matchers, picks):
            engine.accept(m, pick)
        accept_s.append(time.perf_counter() - t)
        for i, (m, pick) in enumerate(zip(matchers, picks)):
            if pick == eos:
                results.setdefault(kinds[i], []).append(hf_tok.decode(tokens[i]))
                tokens[i] = []
                m.reset()
            else:
                tokens[i].append(pick)
    return fill_s, accept_s


def bench_apply(engine, batch: int, reps: int) -> dict:
    import torch
    bitmask = engine.allocate(batch)
    bitmask.copy_(torch.randint(-2**31, 2**31 - 1, bitmask.shape, dtype=torch.int32))
    logits = torch.randn(batch, engine.vocab)
    try:
        first = timed(engine.apply, logits, bitmask)[1]  # llguidance: torch.compile
    except Exception as e:  # noqa: BLE001 - report an engine's apply that cannot run here
        print(f"  {engine.name} apply failed: {type(e).__name__}: {str(e)[:300]}")
        first, engine.apply = float("nan"), lambda *a: None
    own = [timed(engine.apply, logits, bitmask)[1] for _ in range(reps)]
    shifts = torch.arange(32, dtype=torch.int32)

    def masked_fill():
        bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :engine.vocab]
        logits.masked_fill_(bits == 0, float("-inf"))

    base = [timed(masked_fill)[1] for _ in range(reps)]
    return {"apply_first_ms": f"{first * 1e3:.1f}", "apply_ms": ms(own),
            "apply_p99_ms": f"{p99(own) * 1e3:.3f}", "masked_fill_ms": ms(base)}


def check_outputs(results: dict) -> dict:
    import jsonschema
    import regex
    checks = {}
    for kind, outs in results.items():
        ok = 0
        for text in outs:
            try:
                if kind == "schema":
                    jsonschema.validate(json.loads(text), SCHEMA)
                elif kind == "json_object":
                    assert isinstance(json.loads(text), dict)
                elif kind == "regex":
                    assert regex.fullmatch(REGEX, text)
                ok += 1
            except Exception as e:  # noqa: BLE001 - a failure is a finding, print it
                print(f"  INVALID {kind}: {text[:200]!r}: {type(e).__name__}: {str(e)[:200]}")
        checks[kind] = f"{ok}/{len(outs)}"
    return checks


def bench_engine(name: str, hf_tok, vocab: int, args) -> dict:
    cls = ENGINES[name]
    setup = [timed(cls, hf_tok, vocab, args.threads)[1] for _ in range(args.setup_reps)]
    engine = cls(hf_tok, vocab, args.threads)
    row = {"tokenizer_setup_ms": ms(setup), "compile": bench_compile(engine, args.compile_reps)}
    batches = {kind: [kind] * args.batch for kind in KINDS}
    batches["mixed"] = [KINDS[i % 4] for i in range(args.batch)]
    results: dict = {}
    for label, kinds in batches.items():
        fill_s, accept_s = [], []
        for r in range(args.rounds):
            f, a = run_batch(engine, hf_tok, kinds, args.steps, args.seed + r, results)
            fill_s += f
            accept_s += a
        row[f"mask_{label}"] = {"median_ms": ms(fill_s), "p99_ms": f"{p99(fill_s) * 1e3:.3f}",
                                "accept_median_ms": ms(accept_s)}
    row.update(bench_apply(engine, args.batch, args.apply_reps))
    # Unbiased-by-timing validity run: 16 schema matchers until each has finished twice.
    for r in range(4):
        run_batch(engine, hf_tok, ["schema"] * args.batch, args.steps * 4, 1000 + r, results)
    row["valid"] = check_outputs(results)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="llguidance,xgrammar")
    ap.add_argument("--vocabs", default="8192,151936")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile-reps", type=int, default=5)
    ap.add_argument("--setup-reps", type=int, default=3)
    ap.add_argument("--apply-reps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(tempfile.gettempdir()) / "zomni_bench_grammar")
    ap.add_argument("--json", type=Path, help="also write all figures here")
    args = ap.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    import torch
    torch.set_num_threads(args.threads)
    from importlib.metadata import version
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, threads={args.threads}, python {platform.python_version()}")
    print("versions: " + ", ".join(f"{p} {version(p)}" for p in
          ["llguidance", "xgrammar", "torch", "transformers", "tokenizers", "jsonschema"]))
    report = {}
    for vocab in (int(v) for v in args.vocabs.split(",")):
        hf_tok, t = timed(build_tokenizer, vocab, args.cache_dir)
        print(f"\nvocab {vocab}: trained tokenizer has {len(hf_tok)} tokens ({t:.1f} s to load"
              f" or build, cache {args.cache_dir})")
        for name in args.engines.split(","):
            row = bench_engine(name, hf_tok, vocab, args)
            report[f"{name}@{vocab}"] = row
            print(f"  {name}: {json.dumps(row, indent=None)}")
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def print_table(report: dict):
    keys = list(report)
    rows = [("tokenizer setup ms", lambda r: r["tokenizer_setup_ms"])]
    for kind in KINDS:
        for field in ("cold_ms", "second_ms", "first_mask_ms"):
            rows.append((f"compile {kind} {field}", lambda r, k=kind, f=field: r["compile"][k][f]))
    for label in KINDS + ["mixed"]:
        for field in ("median_ms", "p99_ms", "accept_median_ms"):
            rows.append((f"mask x16 {label} {field}", lambda r, k=label, f=field:
                         r[f"mask_{k}"][f]))
    for field in ("apply_first_ms", "apply_ms", "apply_p99_ms", "masked_fill_ms"):
        rows.append((field, lambda r, f=field: r[f]))
    rows.append(("valid (ok/total)", lambda r: " ".join(f"{k}:{v}" for k, v in
                                                       sorted(r["valid"].items()))))
    width = max(len(n) for n, _ in rows)
    print("\n" + " " * width + " | " + " | ".join(f"{k:>24}" for k in keys))
    for label, get in rows:
        print(f"{label:<{width}} | " + " | ".join(f"{get(report[k]):>24}" for k in keys))


if __name__ == "__main__":
    main()
