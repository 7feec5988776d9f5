"""Tokens per second of sdcore's CLIP tokenizer and transformers' on the parity corpus.

    python tools/bench_tokenizer.py                        # sdcore, and transformers 5's CLIPTokenizer (Rust)
    PYTHONPATH=/tmp/tf4 python tools/bench_tokenizer.py    # with transformers 4.x: its slow and fast ones

Two workloads on tests/data/prompts.jsonl: every prompt, and the plain-ASCII prompts only (most real
prompts; sdcore skips ftfy for those). Each is timed as one call per prompt returning the untruncated
ids ("encode") and as one batched call returning the [N, 77] windows ("batch 77"). Tokens are
sdcore's untruncated count without BOS/EOS, the same for every implementation. Best of `--repeat`
runs after a warm-up run (so the BPE caches are warm); sdcore's first run is also reported ("cold").
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from sdcore.testing.prompt_corpus import read_corpus
from sdcore.tokenizer import CLIPTokenizer, write_vocab_files
from sdcore.tokenizer.clip_tokenizer import _FTFY_NOOP


def _best(fn, repeat: int) -> tuple[float, float]:
    """(first run, best of the next `repeat` runs) in seconds."""
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times[0], min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--folder", default="/tmp/sdcore_bench_tokenizer", help="where to write the vocab files")
    args = parser.parse_args()

    prompts = read_corpus()
    workloads = {"all": prompts, "ascii": [p for p in prompts if _FTFY_NOOP.fullmatch(p)]}
    write_vocab_files(args.folder)
    impls = {}

    def make_sdcore():
        tok = CLIPTokenizer.from_dir(args.folder)
        return tok.encode, tok

    impls["sdcore"] = make_sdcore
    try:
        import transformers
        from transformers import CLIPTokenizer as HFTokenizer
        from transformers import CLIPTokenizerFast
    except ImportError:
        transformers = None
    if transformers is not None:
        classes = {"CLIPTokenizer": HFTokenizer, "CLIPTokenizerFast": CLIPTokenizerFast}
        if CLIPTokenizerFast is HFTokenizer:
            del classes["CLIPTokenizerFast"]  # transformers 5: one class, backed by the Rust tokenizers
        for name, cls in classes.items():

            def make(cls=cls):
                tok = cls.from_pretrained(args.folder)
                window = dict(padding="max_length", max_length=77, truncation=True, return_tensors="np")
                return (lambda text: tok(text)["input_ids"]), (lambda texts: tok(texts, **window)["input_ids"])

            kind = "slow, Python" if hasattr(cls, "bpe") else "Rust tokenizers"
            impls[f"transformers {name} {transformers.__version__} ({kind})"] = make

    counter = CLIPTokenizer.from_dir(args.folder)
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    print("| implementation | workload | prompts | tokens | encode tok/s (cold) | encode tok/s | batch 77 tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name, make in impls.items():
        for workload, texts in workloads.items():
            tokens = sum(len(counter.encode(t, add_special_tokens=False)) for t in texts)
            encode, batch = make()
            cold, warm = _best(lambda: [encode(t) for t in texts], args.repeat)  # noqa: B023 - called here
            _, batched = _best(lambda: batch(texts), args.repeat)  # noqa: B023 - called here
            rates = " | ".join(f"{tokens / seconds:,.0f}" for seconds in (cold, warm, batched))
            print(f"| {name} | {workload} | {len(texts)} | {tokens} | {rates} |")


if __name__ == "__main__":
    main()
