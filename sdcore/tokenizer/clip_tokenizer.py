"""CLIP's byte-level BPE tokenizer, written by hand (NumPy, regex and ftfy only).

Reference: OpenAI CLIP's `simple_tokenizer.py` (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision") as packaged by transformers' slow `CLIPTokenizer`
(transformers 4.x `models/clip/tokenization_clip.py`), which is what diffusers and A1111 fed Stable
Diffusion 1.x/2.x with. The steps, in the order that tokenizer applies them:

1. special tokens (`<|startoftext|>`, `<|endoftext|>`, the pad token: `!` for SD2.x) are cut out of
   the raw text wherever they occur, case-sensitively, and map straight to their ids;
2. each remaining segment is normalised: `ftfy.fix_text`, optionally `html.unescape` twice (OpenAI
   CLIP/open_clip do this; transformers does not, see `html_unescape`), whitespace runs to one space,
   strip, lower-case;
3. CLIP's regex splits it into words, numbers (one digit each) and punctuation runs;
4. each piece's UTF-8 bytes are mapped to printable characters (`bytes_to_unicode`), the last one
   gets `</w>`, and BPE merges are applied lowest rank first, all occurrences left to right.

Token ids, the 77-token window and the padding match `CLIPTokenizer(...)(text, padding="max_length",
max_length=77, truncation=True)`: BOS, up to 75 tokens, EOS, then pad ids.
"""

from __future__ import annotations

import dataclasses
import gzip
import html
import json
import os
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

from sdcore.errors import SdcoreError

BPE_GZ_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")

# CLIP's vocabulary is 49152 = 256 bytes + 256 bytes with </w> + 48894 merges + 2 specials; the
# merges file ships far more merges than that, and CLIP (and transformers) use only the first ones.
NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"

# Case-insensitive like the reference. The text is lower-cased before, so the flag matters for one
# code point only: U+0345 (it case-folds to a letter) then matches no alternative and is dropped.
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
# Text made only of these characters comes out of ftfy.fix_text unchanged (ASCII cannot be mojibake;
# '&' could start an HTML entity and the other control characters are removed), so ftfy, 80% of the
# encoding time, is skipped for it. tests/test_tokenizer.py checks this against ftfy.
_FTFY_NOOP = regex.compile(r"[\t\n\x20-\x25\x27-\x7e]*")

# tokenizer_config.json keys that sdcore reads, or that do not change the ids (decoding options,
# bookkeeping); any other key raises.
_KNOWN_CONFIG_KEYS = frozenset({
    "add_prefix_space", "clean_up_tokenization_spaces", "errors", "name_or_path", "special_tokens_map_file",
    "tokenizer_file", "added_tokens_decoder", "processor_class", "auto_map", "backend", "extra_special_tokens",
    "model_input_names", "padding_side", "truncation_side", "use_fast", "split_special_tokens", "is_local",
    "local_files_only",
    "additional_special_tokens", "bos_token", "eos_token", "unk_token", "pad_token", "model_max_length",
    "do_lower_case", "tokenizer_class",
})
# transformers writes this when no length is known ("no limit"); a CLIP window needs a real one.
_VERY_LARGE_INTEGER = int(1e20)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character, so BPE never sees whitespace or control characters.

    The 188 printable Latin-1 bytes map to themselves; the other 68 (controls, space, NBSP, soft
    hyphen, ...) map to U+0100 onwards in byte order. The insertion order of the dict is the order of
    the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _token_content(value) -> str | None:
    """A special token in a config file is a string or an AddedToken dict; reject stripping flags."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        for flag in ("lstrip", "rstrip", "single_word"):
            if value.get(flag):
                raise SdcoreError(
                    f"Special token {value['content']!r} sets {flag}=true, which sdcore's tokenizer does not support."
                )
        return value["content"]
    raise SdcoreError(f"Cannot read special token {value!r} from the tokenizer config.")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SdcoreError(f"Cannot read tokenizer file {path}: {e}.") from e


def _read_merges(lines: list[str], source: str) -> list[tuple[str, str]]:
    """Merge lines "a b", after the "#version" header, cut to the first NUM_MERGES as CLIP does."""
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for line in lines[:NUM_MERGES]:
        parts = line.split()
        if len(parts) != 2:
            raise SdcoreError(f"Malformed merge {line!r} in {source}: expected two symbols separated by a space.")
        merges.append((parts[0], parts[1]))
    return merges


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """The special token strings of one tokenizer folder (SD1.x pads with EOS, SD2.x with "!")."""

    bos_token: str = BOS_TOKEN
    eos_token: str = EOS_TOKEN
    unk_token: str = EOS_TOKEN
    pad_token: str = EOS_TOKEN
    model_max_length: int = 77


class CLIPTokenizer:
    """CLIP BPE tokenizer with the ids, window and padding of transformers' slow `CLIPTokenizer`.

    Build it with `from_dir` (a diffusers `tokenizer/` folder) or `from_bpe_gz` (the shipped merges,
    for single-file checkpoints). `html_unescape=True` adds OpenAI CLIP's double `html.unescape` after
    ftfy (what open_clip, and so SD2.x training, did); it is off by default because transformers'
    tokenizer, used by diffusers and A1111 for SD1.x and SD2.x, does not do it.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        special: SpecialTokens = SpecialTokens(),
        extra_added_tokens: dict[str, int] | None = None,
        html_unescape: bool = False,
    ):
        self.vocab = vocab
        self.decoder = {i: t for t, i in vocab.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.special = special
        self.html_unescape = html_unescape
        self.model_max_length = special.model_max_length
        if self.model_max_length < 2 or self.model_max_length >= _VERY_LARGE_INTEGER:
            raise SdcoreError(
                f"Tokenizer model_max_length {self.model_max_length} is not a usable CLIP window length (77 expected)."
            )

        # Added tokens: the specials plus any listed in the config; each is cut out of the raw text.
        added: dict[str, int] = {}
        for token in (special.bos_token, special.eos_token, special.unk_token, special.pad_token):
            if token not in vocab:
                raise SdcoreError(f"Special token {token!r} is not in the tokenizer vocabulary.")
            added[token] = vocab[token]
        for token, token_id in (extra_added_tokens or {}).items():
            if vocab.get(token) != token_id:
                raise SdcoreError(
                    f"The tokenizer adds token {token!r} (id {token_id}) that is not in its vocabulary; added "
                    "tokens (textual inversion and the like) are not supported."
                )
            added[token] = token_id
        self.added_tokens = added
        # Longest first, so that at one position the longest added token wins (transformers' trie).
        alternatives = sorted(added, key=len, reverse=True)
        self._added_pattern = regex.compile("(" + "|".join(regex.escape(t) for t in alternatives) + ")")

        self.bos_token_id = vocab[special.bos_token]
        self.eos_token_id = vocab[special.eos_token]
        self.unk_token_id = vocab[special.unk_token]
        self.pad_token_id = vocab[special.pad_token]
        # A1111 splits long prompts at the last comma that fits in a 75-token chunk.
        self.comma_token_id = vocab.get("," + END_OF_WORD)

        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        # Regex piece (before the byte mapping) -> ids. The reference seeds its cache with the two
        # specials so that a lower-cased "<|ENDOFTEXT|>" still maps to the special id.
        self._cache: dict[str, tuple[int, ...]] = {
            BOS_TOKEN: (self._lookup(BOS_TOKEN),),
            EOS_TOKEN: (self._lookup(EOS_TOKEN),),
        }

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_dir(cls, path, html_unescape: bool = False) -> "CLIPTokenizer":
        """Load a tokenizer folder: vocab.json + merges.txt (or tokenizer.json), tokenizer_config.json,
        special_tokens_map.json (which overrides the config, as in transformers)."""
        path = Path(path)
        if not path.is_dir():
            raise SdcoreError(f"Tokenizer folder {path} does not exist.")
        tokenizer_json = _read_json(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            vocab = _read_json(path / "vocab.json")
            with open(path / "merges.txt", encoding="utf-8") as f:
                merges = _read_merges(f.read().strip().split("\n"), str(path / "merges.txt"))
        elif tokenizer_json is not None:
            model = tokenizer_json.get("model", {})
            if model.get("type") != "BPE":
                raise SdcoreError(f"{path / 'tokenizer.json'} holds a {model.get('type')!r} model, not CLIP's BPE.")
            vocab = model["vocab"]
            raw = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            merges = _read_merges(raw, str(path / "tokenizer.json"))
        else:
            raise SdcoreError(f"Tokenizer folder {path} has neither vocab.json + merges.txt nor tokenizer.json.")

        config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        unknown = sorted(set(config) - _KNOWN_CONFIG_KEYS)
        if unknown:
            raise SdcoreError(f"Unsupported tokenizer_config.json option(s) in {path}: {', '.join(unknown)}.")
        if config.get("tokenizer_class") not in (None, "CLIPTokenizer", "CLIPTokenizerFast"):
            raise SdcoreError(f"Tokenizer class {config['tokenizer_class']!r} in {path} is not CLIPTokenizer.")
        if config.get("do_lower_case") is False:
            raise SdcoreError(f"Tokenizer in {path} sets do_lower_case=false; CLIP always lower-cases.")
        if config.get("split_special_tokens"):
            raise SdcoreError(f"Tokenizer in {path} sets split_special_tokens=true, which sdcore does not support.")
        for key in ("additional_special_tokens", "extra_special_tokens"):
            if config.get(key):
                raise SdcoreError(f"Tokenizer in {path} lists {key}, which sdcore does not support.")
        values = dict(config)
        if (path / "special_tokens_map.json").is_file():
            values.update(_read_json(path / "special_tokens_map.json"))
        defaults = SpecialTokens()
        special = SpecialTokens(
            bos_token=_token_content(values.get("bos_token")) or defaults.bos_token,
            eos_token=_token_content(values.get("eos_token")) or defaults.eos_token,
            unk_token=_token_content(values.get("unk_token")) or defaults.unk_token,
            pad_token=_token_content(values.get("pad_token")) or defaults.pad_token,
            model_max_length=int(config.get("model_max_length", defaults.model_max_length)),
        )
        extra = {}
        for token_id, token in config.get("added_tokens_decoder", {}).items():
            extra[_token_content(token)] = int(token_id)
        for token in (tokenizer_json or {}).get("added_tokens", []):
            extra[_token_content(token)] = int(token["id"])
        if (path / "added_tokens.json").is_file():
            extra.update(_read_json(path / "added_tokens.json"))
        return cls(vocab, merges, special, extra, html_unescape=html_unescape)

    @classmethod
    def from_bpe_gz(
        cls, path=None, pad_token: str = EOS_TOKEN, model_max_length: int = 77, html_unescape: bool = False
    ) -> "CLIPTokenizer":
        """Build the vocabulary from OpenAI's merges file (default: the copy shipped with sdcore).

        Vocabulary order, as CLIP builds it: the 256 byte characters, the same with </w>, one entry
        per merge, then <|startoftext|> and <|endoftext|> (ids 49406, 49407).
        """
        path = Path(path) if path is not None else BPE_GZ_PATH
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except OSError as e:
            raise SdcoreError(f"Cannot read BPE merges {path}: {e}.") from e
        # The first line is a "bpe_simple_vocab_16e6.txt#version: 0.2" header.
        merges = _read_merges(lines[1:], str(path))
        if len(merges) != NUM_MERGES:
            raise SdcoreError(f"{path} holds {len(merges)} merges; CLIP needs {NUM_MERGES}.")
        tokens = list(bytes_to_unicode().values())
        tokens += [t + END_OF_WORD for t in tokens]
        tokens += [a + b for a, b in merges]
        tokens += [BOS_TOKEN, EOS_TOKEN]
        vocab = {t: i for i, t in enumerate(tokens)}
        special = SpecialTokens(pad_token=pad_token, model_max_length=model_max_length)
        return cls(vocab, merges, special, html_unescape=html_unescape)

    def save_pretrained(self, out_dir) -> None:
        """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json in the
        layout of the Hugging Face CLIP tokenizer folders, loadable by transformers' CLIPTokenizer."""
        s = self.special
        extra = sorted(set(self.added_tokens) - {s.bos_token, s.eos_token, s.unk_token, s.pad_token})
        if extra:
            raise SdcoreError(f"Cannot save added tokens other than the special ones: {', '.join(extra)}.")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        merges = sorted(self.bpe_ranks, key=self.bpe_ranks.__getitem__)
        with open(out_dir / "vocab.json", "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        with open(out_dir / "merges.txt", "w", encoding="utf-8") as f:
            f.write(MERGES_HEADER + "\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokens = {
            "bos_token": s.bos_token, "eos_token": s.eos_token, "pad_token": s.pad_token, "unk_token": s.unk_token
        }
        config = {
            **tokens,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": s.model_max_length,
            "tokenizer_class": "CLIPTokenizer",
        }
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", tokens)):
            with open(out_dir / name, "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2, ensure_ascii=False)
                f.write("\n")

    # ---------------------------------------------------------------- encoding

    def _lookup(self, token: str) -> int:
        # An unknown BPE symbol becomes the unk id, as in the reference (cannot happen with CLIP's files).
        added = self.added_tokens.get(token)
        return added if added is not None else self.vocab.get(token, self.unk_token_id)

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Ids of one regex piece: map its bytes, mark the word end, merge lowest rank first."""
        encoder = self._byte_encoder
        chars = "".join(encoder[b] for b in piece.encode("utf-8"))
        word = [*chars[:-1], chars[-1] + END_OF_WORD]
        ranks = self.bpe_ranks
        while len(word) > 1:
            best_rank, best = None, None
            for pair in zip(word, word[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged, i, n = [], 0, len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(self._lookup(t) for t in word)

    def normalize(self, text: str) -> str:
        """The text clean-up of one segment (no special tokens in it): ftfy, [html], whitespace, lower."""
        if not _FTFY_NOOP.fullmatch(text):
            text = ftfy.fix_text(text)
        if self.html_unescape:
            text = html.unescape(html.unescape(text))
        return _WHITESPACE.sub(" ", text).strip().lower()

    def _encode_segment(self, text: str, ids: list[int]) -> None:
        cache = self._cache
        for piece in _WORD_PATTERN.findall(self.normalize(text)):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = cache[piece] = self._bpe(piece)
            ids.extend(piece_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """All ids of `text`, untruncated; with BOS/EOS around them if `add_special_tokens`."""
        if not isinstance(text, str):
            raise SdcoreError(f"Prompt must be a string, got {type(text).__name__}.")
        ids: list[int] = [self.bos_token_id] if add_special_tokens else []
        # re.split with a capturing group alternates: text, added token, text, ...
        for i, part in enumerate(self._added_pattern.split(text)):
            if i % 2:
                ids.append(self.added_tokens[part])
            elif part:
                self._encode_segment(part, ids)
        if add_special_tokens:
            ids.append(self.eos_token_id)
        return ids

    def tokenize(self, text: str) -> list[str]:
        """The BPE token strings of `text` (byte-mapped, with </w>), without BOS/EOS."""
        return [self.decoder[i] for i in self.encode(text, add_special_tokens=False)]

    def pad_ids(self, ids: list[int], max_length: int | None = None) -> list[int]:
        """BOS + the first max_length-2 of `ids` (no specials) + EOS, padded with the pad id."""
        max_length = max_length or self.model_max_length
        window = [self.bos_token_id, *ids[: max_length - 2], self.eos_token_id]
        return window + [self.pad_token_id] * (max_length - len(window))

    def __call__(self, texts: str | list[str]) -> np.ndarray:
        """[N, model_max_length] int64 ids: BOS, up to 75 tokens, EOS, padding (truncated, like
        transformers with padding="max_length", max_length=77, truncation=True)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.pad_ids(self.encode(t, add_special_tokens=False)) for t in texts]
        return np.asarray(rows, dtype=np.int64).reshape(len(rows), self.model_max_length)  # [N, 77]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`: the byte-level inverse of BPE, each </w> read as a space. Lossy: the
        normalisation is not undone, and invalid UTF-8 becomes U+FFFD."""
        data = bytearray()
        for token_id in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():  # [T]
            token = self.decoder[token_id]
            if token in self.added_tokens:
                if not skip_special_tokens:
                    data += token.encode("utf-8")
                continue
            word_end = token.endswith(END_OF_WORD)
            data += bytes(self._byte_decoder[c] for c in (token[: -len(END_OF_WORD)] if word_end else token))
            if word_end:
                data += b" "
        return data.decode("utf-8", errors="replace").strip()


def write_vocab_files(out_dir, pad_token: str = EOS_TOKEN) -> None:
    """Write a tokenizer folder built from the shipped merges into a converted model directory.

    SD1.x pads with "<|endoftext|>" (id 49407), SD2.x with "!" (id 0).
    """
    CLIPTokenizer.from_bpe_gz(pad_token=pad_token).save_pretrained(os.fspath(out_dir))
