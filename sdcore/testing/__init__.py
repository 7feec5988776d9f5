"""Helpers shared by tests/ and tools/, importable from the install (no sys.path tricks):

- `checkpoints`: random-weight SD checkpoints (diffusers folders, original-format single files)
  built with the reference libraries from `sdcore.presets`;
- `original_format`: diffusers/transformers state dicts -> the original CompVis/Stability layout
  (the test-side inverse of sdcore/convert/original*.py);
- `prompt_corpus`: the seeded prompt corpus of the tokenizer tests and benchmark.

`import sdcore` never imports this package, and these modules import torch, diffusers and
transformers (the test extra) only inside the functions that need them.
"""
