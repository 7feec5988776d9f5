"""CLIPTextConfig: the keys of transformers' `CLIPTextConfig` (text_encoder/config.json) that shape the network.

Reference: transformers/models/clip/configuration_clip.py. Defaults are transformers' defaults, so a
config.json that omits a key means what it means to transformers. Everything else a config.json may
carry is either on `IGNORED_KEYS` (training-only or generic bookkeeping) or an error.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from sdcore.errors import SdcoreError

SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu")

# Keys with no effect on inference of the text encoder: dropout/init (training), names and versions,
# and the generic PretrainedConfig fields (generation, heads, output flags) that CLIP does not use.
IGNORED_KEYS = frozenset({
    "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "architectures", "transformers_version",
    "torch_dtype", "dtype", "attention_dropout", "dropout", "initializer_range", "initializer_factor",
    "gradient_checkpointing", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "add_cross_attention",
    "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "tokenizer_class",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type",
})


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower of CLIP. SD1.x: ViT-L/14 (768 wide, 12 layers, quick_gelu); SD2.x: OpenCLIP ViT-H
    converted to transformers' layout (1024 wide, 23 of its 24 layers, gelu)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512  # used by CLIPTextModelWithProjection only; kept so the config round-trips
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    # 2 in SD1.x/SD2.x configs (written before transformers fixed it): pooling then takes the
    # position of the largest id, which is <|endoftext|> in the original CLIP vocabulary.
    eos_token_id: int | None = 49407

    def __post_init__(self):
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise SdcoreError(
                f"text encoder hidden_act {self.hidden_act!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_ACTIVATIONS)})."
            )
        if self.hidden_size % self.num_attention_heads:
            raise SdcoreError(
                f"text encoder hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}."
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SdcoreError(f"text encoder {key} must be a positive integer, found {value!r}.")
        if self.eos_token_id is not None and not isinstance(self.eos_token_id, int):
            raise SdcoreError(f"text encoder eos_token_id must be one integer, found {self.eos_token_id!r}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        """Read a transformers CLIPTextConfig dict; unknown keys and unsupported values raise SdcoreError."""
        fields = {f.name for f in dataclasses.fields(cls)}
        model_type = d.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise SdcoreError(f"text encoder model_type {model_type!r} is not supported (expected 'clip_text_model').")
        if d.get("use_attention_mask"):
            raise SdcoreError("text encoder option use_attention_mask=true is not supported.")
        unknown = sorted(k for k in d if k not in fields and k not in IGNORED_KEYS
                         and k not in ("model_type", "use_attention_mask"))
        if unknown:
            raise SdcoreError(f"text encoder config has unknown keys: {', '.join(unknown)}.")
        return cls(**{k: v for k, v in d.items() if k in fields})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "CLIPTextConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise SdcoreError(f"cannot read text encoder config {os.fspath(path)}: {err}.") from err
        return cls.from_dict(d)


def check_input_ids(config: CLIPTextConfig, input_ids) -> None:
    """Raise SdcoreError unless `input_ids` is a [B, N] integer array of ids in 0..vocab_size-1.

    The compiled embedding lookup does not bounds-check (an out-of-range id reads out of bounds), so
    callers check on the host before running the model.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise SdcoreError(
            f"text encoder input_ids must be a [batch, length] integer array, found {ids.dtype} {ids.shape}."
        )
    bad = ids[(ids < 0) | (ids >= config.vocab_size)]
    if bad.size:
        raise SdcoreError(
            f"text encoder input id {int(bad[0])} is outside the vocabulary (0..{config.vocab_size - 1}): "
            "is the tokenizer the one of this model?"
        )
