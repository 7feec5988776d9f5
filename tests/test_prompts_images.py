"""Long-prompt chunking (A1111 semantics) and image I/O (diffusers' conversions, A1111 PNG parameters)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from PIL import Image

from sdcore import prompts
from sdcore.errors import SdcoreError
from sdcore.images import array_to_images, image_to_array, infotext, mask_to_array, save_png
from sdcore.tokenizer import CLIPTokenizer

COMMA = 267  # stands in for the comma id in the pure chunking tests


def test_short_prompt_is_one_chunk():
    assert prompts.chunk_ids([1, 2, 3], COMMA) == [[1, 2, 3]]
    assert prompts.chunk_ids([], COMMA) == [[]]


def test_exactly_75_tokens_is_one_chunk():
    assert prompts.chunk_ids(list(range(75)), COMMA) == [list(range(75))]


def test_split_without_comma_is_at_75():
    ids = list(range(1000, 1160))
    chunks = prompts.chunk_ids(ids, COMMA)
    assert [len(c) for c in chunks] == [75, 75, 10]
    assert sum(chunks, []) == ids


def test_split_after_last_comma_within_backtrack():
    ids = [1000 + i for i in range(70)]
    ids[60] = COMMA  # 15 tokens from the end of the first chunk: within the backtrack of 20
    ids += [2000 + i for i in range(20)]
    chunks = prompts.chunk_ids(ids, COMMA)
    assert chunks[0] == ids[:61]  # cut just after the comma
    assert chunks[1] == ids[61:]
    assert sum(chunks, []) == ids


def test_comma_too_far_back_is_ignored():
    ids = [1000 + i for i in range(90)]
    ids[10] = COMMA  # 65 tokens before the end of the chunk: beyond the backtrack
    chunks = prompts.chunk_ids(ids, COMMA)
    assert [len(c) for c in chunks] == [75, 15]


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_bpe_gz()


def test_windows_of_short_prompt_equal_the_tokenizer(tokenizer):
    pos, neg = prompts.prompt_windows(tokenizer, "a red circle, on a white background", "")
    np.testing.assert_array_equal(pos, tokenizer(["a red circle, on a white background"]))
    np.testing.assert_array_equal(neg, tokenizer([""]))


def test_long_prompt_and_negative_get_the_same_chunk_count(tokenizer):
    long_prompt = ", ".join(f"detail number {i}" for i in range(40))  # ~160 tokens
    pos, neg = prompts.prompt_windows(tokenizer, long_prompt, "blurry")
    assert pos.shape == neg.shape == (3, 77)
    for row in pos:
        assert row[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in row[1:]
    ids = tokenizer.encode(long_prompt, add_special_tokens=False)
    body = [t for row in pos for t in row[1 : list(row).index(tokenizer.eos_token_id, 1)]]
    assert body == ids  # nothing lost, nothing repeated
    np.testing.assert_array_equal(neg[0], tokenizer(["blurry"])[0])
    np.testing.assert_array_equal(neg[1], tokenizer([""])[0])


def test_image_round_trip():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    x = image_to_array(Image.fromarray(pixels))
    assert x.shape == (1, 3, 16, 24) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(np.asarray(array_to_images(x)[0]), pixels)


def test_mask_is_binarized_white_repaints():
    m = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(mask_to_array(Image.fromarray(m))[0, 0], [[0, 0, 1, 1]])


def test_png_carries_a1111_parameters(tmp_path):
    params = {"prompt": "a cat", "negative_prompt": "blurry", "steps": 20, "sampler": "Euler a",
              "guidance_scale": 7.0, "seed": 5, "size": "512x512", "model_hash": "abcdef0123"}
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "out.png", params)
    text = Image.open(path).text["parameters"]
    assert text == ("a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 5, "
                    "Size: 512x512, Model hash: abcdef0123")
    assert infotext({"prompt": "x", "steps": 1}) == "x\nSteps: 1"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left


def test_png_refuses_other_suffix(tmp_path):
    with pytest.raises(SdcoreError):
        save_png(Image.new("RGB", (8, 8)), tmp_path / "out.jpg", {})


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_png_mode_follows_the_umask(tmp_path, umask):
    """The PNG gets 0666 less the umask, as any file the user's tools create (not the 0600 of a
    temporary file), also when it replaces an existing file; no temporary file stays behind."""
    (tmp_path / "old.png").write_bytes(b"")
    os.chmod(tmp_path / "old.png", 0o600)
    previous = os.umask(umask)
    try:
        for name in ("new.png", "old.png"):
            save_png(Image.new("RGB", (8, 8)), tmp_path / name, {"prompt": "x"})
            assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name
    finally:
        os.umask(previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.png", "old.png"]


def test_png_write_that_fails_leaves_no_file(tmp_path):
    class Broken:
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_png(Broken(), tmp_path / "out.png", {})
    assert list(tmp_path.iterdir()) == []
