"""Write the tokenizer parity corpus (tests/data/prompts.jsonl) and its reference ids.

    python tools/make_prompt_corpus.py                 # the corpus: seeded, stdlib only, deterministic
    PYTHONPATH=/tmp/tf4 python tools/make_prompt_corpus.py --golden
                                                       # reference id hashes from transformers 4.x

The corpus itself (what it mixes, how it is drawn) is `sdcore.testing.prompt_corpus`.

`--golden` needs transformers' slow, pure-Python `CLIPTokenizer`, which transformers 5 removed:
install 4.x beside the system packages, e.g.
`pip install --no-deps --target /tmp/tf4 transformers==4.57.1 huggingface_hub==0.36.0 tokenizers==0.22.1`.
It writes tests/data/prompts_golden.txt: per prompt, four 12-hex-digit SHA-1 prefixes of the ids of
    tok(text)["input_ids"]                                                  SD1.x folder (pad <|endoftext|>)
    tok(text, padding="max_length", max_length=77, truncation=True)["input_ids"]       SD1.x
    the same two with the SD2.x folder (pad "!")
where the folders are the ones `sdcore.tokenizer.write_vocab_files` writes (see `ids_digest`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from sdcore.testing.prompt_corpus import GOLDEN, ids_digest, read_corpus, write_corpus


def write_golden(path: Path = GOLDEN) -> None:
    import transformers
    from transformers.models.clip.tokenization_clip import CLIPTokenizer as SlowCLIPTokenizer

    from sdcore.tokenizer import write_vocab_files

    if not hasattr(SlowCLIPTokenizer, "bpe"):
        sys.exit(f"transformers {transformers.__version__} has no slow CLIPTokenizer; install 4.x (see --help).")
    prompts = read_corpus()
    columns = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, pad in (("sd1", "<|endoftext|>"), ("sd2", "!")):
            folder = Path(tmp) / name
            write_vocab_files(folder, pad_token=pad)
            tok = SlowCLIPTokenizer.from_pretrained(folder)
            assert tok.pad_token == pad
            full = [ids_digest(tok(p)["input_ids"]) for p in prompts]
            window = dict(padding="max_length", max_length=77, truncation=True)
            padded = [ids_digest(tok(p, **window)["input_ids"]) for p in prompts]
            columns += [full, padded]
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# transformers {transformers.__version__} slow CLIPTokenizer; see tools/make_prompt_corpus.py\n")
        for row in zip(*columns):
            f.write(" ".join(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden", action="store_true", help="write the reference ids (needs transformers 4.x)")
    args = parser.parse_args()
    if args.golden:
        write_golden()
    else:
        write_corpus()


if __name__ == "__main__":
    main()
