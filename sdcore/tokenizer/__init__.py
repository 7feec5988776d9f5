"""CLIP's byte-level BPE tokenizer (pure Python + regex + ftfy) and its vocabulary data."""

from sdcore.tokenizer.clip_tokenizer import BPE_GZ_PATH, CLIPTokenizer, bytes_to_unicode, write_vocab_files

__all__ = ["BPE_GZ_PATH", "CLIPTokenizer", "bytes_to_unicode", "write_vocab_files"]
