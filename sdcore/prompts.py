"""Prompt → token windows for the text encoder, with long prompts in 75-token chunks (A1111 style).

A prompt that fits (≤ 75 tokens) gives exactly the checkpoint tokenizer's one window:
BOS + tokens + EOS, padded to 77 with the pad token (SD1.x `<|endoftext|>`, SD2.x `!`), so short
prompts match diffusers bit for bit. A longer prompt is cut into chunks of at most 75 tokens; when a
chunk fills up, it is cut after the last comma among its final `COMMA_BACKTRACK` tokens (if any) and
the rest moves to the next chunk, as AUTOMATIC1111 does. Each chunk becomes its own 77-token window,
the windows are encoded separately and their hidden states concatenated along the sequence axis
(77·k tokens). The negative prompt is padded with empty windows to the same number of chunks.
"""

from __future__ import annotations

import numpy as np

CHUNK = 75  # tokens per window, without BOS/EOS
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default


def chunk_ids(ids: list[int], comma_id: int) -> list[list[int]]:
    """Split untruncated token ids (no BOS/EOS) into chunks of ≤ CHUNK tokens; at least one chunk."""
    chunks: list[list[int]] = []
    current: list[int] = []
    last_comma = -1
    for token in ids:
        if len(current) == CHUNK:
            if last_comma >= 0 and len(current) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                chunks.append(current[:cut])
                current = current[cut:]
            else:
                chunks.append(current)
                current = []
            last_comma = max((i for i, t in enumerate(current) if t == comma_id), default=-1)
        if token == comma_id:
            last_comma = len(current)
        current.append(token)
    if current or not chunks:
        chunks.append(current)
    return chunks


def windows(tokenizer, prompt: str, min_chunks: int = 1) -> np.ndarray:
    """[k, 77] int64 token windows for `prompt`, k = max(chunks needed, min_chunks)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    chunks = chunk_ids(ids, tokenizer.comma_token_id)
    chunks += [[] for _ in range(min_chunks - len(chunks))]
    length = tokenizer.model_max_length
    out = np.full((len(chunks), length), tokenizer.pad_token_id, dtype=np.int64)
    for row, chunk in zip(out, chunks):
        row[: len(chunk) + 2] = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
    return out


def prompt_windows(tokenizer, prompt: str, negative_prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """Windows of the prompt and the negative prompt, padded to the same number of chunks."""
    pos = windows(tokenizer, prompt)
    neg = windows(tokenizer, negative_prompt, min_chunks=len(pos))
    if len(neg) > len(pos):
        pos = windows(tokenizer, prompt, min_chunks=len(neg))
    return pos, neg
