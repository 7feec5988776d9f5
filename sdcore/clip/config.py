"""CLIPTextConfig: the keys of transformers' `CLIPTextConfig` (text_encoder/config.json) that shape the network.

Reference: transformers/models/clip/configuration_clip.py. Defaults are transformers' defaults, so a
config.json that omits a key means what it means to transformers. Keys are read as sdcore/config.py
describes: a field, an ignored key with its reason, or an unsupported option that must hold its
inert value.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sdcore.config import ConfigBase
from sdcore.errors import SdcoreError

SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu")


def _because(why: str, keys: str) -> dict[str, str]:
    return dict.fromkeys(keys.split(), why)


# Keys with no effect on inference of the text encoder, with why.
IGNORED = {
    **_because("bookkeeping written by transformers",
               "_name_or_path _commit_hash _attn_implementation_autoset architectures transformers_version"),
    **_because("the storage dtype: sdcore chooses the precision itself", "torch_dtype dtype"),
    **_because("training only (dropout, initialisation, checkpointing)",
               "attention_dropout dropout initializer_range initializer_factor gradient_checkpointing"),
    **_because("the projection head of CLIPTextModelWithProjection: SD conditions on the hidden states",
               "projection_dim"),
    **_because("output options of transformers' forward: sdcore returns fixed outputs",
               "return_dict output_hidden_states output_attentions torchscript use_bfloat16 tf_legacy_loss "
               "pruned_heads tie_word_embeddings chunk_size_feed_forward"),
    **_because("generic PretrainedConfig fields of encoder-decoder models and generation, unused by CLIP",
               "is_encoder_decoder is_decoder cross_attention_hidden_size add_cross_attention "
               "tie_encoder_decoder max_length min_length do_sample early_stopping num_beams num_beam_groups "
               "diversity_penalty temperature top_k top_p typical_p repetition_penalty length_penalty "
               "no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences "
               "output_scores return_dict_in_generate forced_bos_token_id forced_eos_token_id "
               "remove_invalid_values exponential_decay_length_penalty suppress_tokens begin_suppress_tokens "
               "decoder_start_token_id sep_token_id"),
    **_because("task heads and tokenizer names, unused by the text model",
               "finetuning_task id2label label2id tokenizer_class prefix task_specific_params problem_type"),
    # the token ids are the tokenizer's (tokenizer/ folder); eos_token_id, which pooling reads, is a field
    **_because("the tokenizer's ids come from the tokenizer folder", "pad_token_id bos_token_id"),
}

UNSUPPORTED_OPTIONS = {
    "use_attention_mask": (False, None),  # SD's text encoders attend to the padding too
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ConfigBase):
    """The text tower of CLIP. SD1.x: ViT-L/14 (768 wide, 12 layers, quick_gelu); SD2.x: OpenCLIP ViT-H
    converted to transformers' layout (1024 wide, 23 of its 24 layers, gelu)."""

    TITLE = "text encoder"
    CLASS_KEY = ("model_type", "clip_text_model")
    IGNORED = IGNORED
    UNSUPPORTED_OPTIONS = UNSUPPORTED_OPTIONS
    POSITIVE = frozenset({"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "max_position_embeddings"})

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
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
