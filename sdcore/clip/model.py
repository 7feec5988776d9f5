"""CLIP's text transformer (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision") in Relax, as Stable Diffusion 1.x/2.x use it to encode prompts.

Reference: transformers/models/clip/modeling_clip.py (`CLIPTextModel`). Parameter names are those of
the text_encoder/model.safetensors files of diffusers' SD folders, `text_model.embeddings...`,
`text_model.encoder.layers.N...`, `text_model.final_layer_norm` (transformers 4's layout;
transformers 5 drops the `text_model.` prefix from its own module tree and adds it back on load).
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from sdcore.clip.config import CLIPTextConfig
from sdcore.errors import SdcoreError
from sdcore.layers import attention

# transformers' legacy eos_token_id: with it, pooling takes the position of the largest id.
_LEGACY_EOS_TOKEN_ID = 2


class _Embedding(nn.Embedding):
    """nn.Embedding whose lookup clamps out-of-range ids (TOPI's default "fast" take is unchecked and
    warns at every compile); the pipeline refuses ids beyond the vocabulary before they get here."""

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        flat = op.reshape(x, [-1])  # [B*N] (or [N])
        rows = op.wrap_nested(relax.op.take(self.weight._expr, flat._expr, axis=0, mode="clip"), name="take")
        return op.reshape(rows, [*x.shape, self.dim])  # [..., C]


class CLIPTextEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings."""

    def __init__(self, config: CLIPTextConfig, dtype: str):
        self.token_embedding = _Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.position_embedding = _Embedding(config.max_position_embeddings, config.hidden_size, dtype=dtype)
        # transformers' position_ids is a non-persistent buffer holding 0..max-1: built in the graph here.

    def forward(self, input_ids: nn.Tensor) -> nn.Tensor:
        seq_len = input_ids.shape[1]
        position_ids = op.arange(0, seq_len, dtype="int32")  # [N]
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)  # [B, N, C] + [N, C]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections."""

    def __init__(self, config: CLIPTextConfig, dtype: str):
        c = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.k_proj = nn.Linear(c, c, dtype=dtype)
        self.v_proj = nn.Linear(c, c, dtype=dtype)
        self.q_proj = nn.Linear(c, c, dtype=dtype)
        self.out_proj = nn.Linear(c, c, dtype=dtype)

    def forward(self, hidden_states: nn.Tensor) -> nn.Tensor:
        q = self.q_proj(hidden_states)
        k = self.k_proj(hidden_states)
        v = self.v_proj(hidden_states)
        # upcast: transformers takes the softmax in float32 whatever the weights' dtype
        return self.out_proj(attention(q, k, v, self.num_heads, causal=True, upcast=True))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig, dtype: str):
        self.hidden_act = config.hidden_act
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, dtype=dtype)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, dtype=dtype)

    def forward(self, hidden_states: nn.Tensor) -> nn.Tensor:
        h = self.fc1(hidden_states)
        if self.hidden_act == "quick_gelu":
            h = h * op.sigmoid(h * 1.702)  # OpenAI CLIP's sigmoid approximation of GELU
        else:
            h = op.gelu(h)  # exact (erf) GELU, transformers' "gelu"
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig, dtype: str):
        self.self_attn = CLIPAttention(config, dtype)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(config, dtype)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)

    def forward(self, hidden_states: nn.Tensor) -> nn.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states))
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig, dtype: str):
        self.layers = nn.ModuleList([CLIPEncoderLayer(config, dtype) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: nn.Tensor, num_layers: int) -> nn.Tensor:
        """Run the first `num_layers` layers; the rest keep their weights but are not traced."""
        for layer in list(self.layers)[:num_layers]:
            hidden_states = layer(hidden_states)
        return hidden_states


class CLIPTextTransformer(nn.Module):
    """The `text_model` of transformers 4's CLIPTextModel: embeddings, encoder, final LayerNorm."""

    def __init__(self, config: CLIPTextConfig, dtype: str):
        self.embeddings = CLIPTextEmbeddings(config, dtype)
        self.encoder = CLIPEncoder(config, dtype)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)


class CLIPTextModel(nn.Module):
    """CLIP text encoder: input_ids [B, N] int32 -> (last_hidden_state [B, N, C], pooled_output [B, C]).

    `clip_skip` follows diffusers' `StableDiffusionPipeline.encode_prompt`: the output is
    final_layer_norm(hidden_states[-(clip_skip + 1)]), where hidden_states = (embeddings, layer 0 output,
    ..., last layer output). `None` or 0 is the usual last_hidden_state; 1 is the output of the
    penultimate layer (then final_layer_norm). A1111's "Clip skip: N" is diffusers' clip_skip = N - 1
    (A1111's 1 = no skip, its 2 = diffusers' 1). Skipped layers are not computed, but stay in the
    module so that the full checkpoint still loads strictly.

    pooled_output is the final-normed hidden state at the EOS position, as transformers computes its
    pooler_output: with the legacy eos_token_id == 2 (SD1.x/SD2.x configs) or none, the position of
    the largest id (original CLIP's rule; the first one if it repeats); otherwise the first position
    of eos_token_id (position 0 when a row has none). With clip_skip it is taken from the
    clip-skipped output. CLIPTextModel has no text_projection, so neither does this. SD1.x/SD2.x
    pipelines use only last_hidden_state.
    """

    def __init__(self, config: CLIPTextConfig, clip_skip: int | None = None, dtype: str = "float32"):
        skip = clip_skip or 0
        if not isinstance(skip, int) or isinstance(skip, bool) or not 0 <= skip <= config.num_hidden_layers:
            raise SdcoreError(
                f"clip_skip must be an integer from 0 to {config.num_hidden_layers} (the text encoder's "
                f"layer count), found {clip_skip!r}."
            )
        self.config = config
        self.clip_skip = skip
        self.dtype = dtype
        self.text_model = CLIPTextTransformer(config, dtype)

    def forward(self, input_ids: nn.Tensor):
        tm = self.text_model
        hidden_states = tm.embeddings(input_ids)  # [B, N, C]
        hidden_states = tm.encoder(hidden_states, self.config.num_hidden_layers - self.clip_skip)
        last_hidden_state = tm.final_layer_norm(hidden_states)  # [B, N, C]
        return last_hidden_state, self._pool(last_hidden_state, input_ids)

    def _pool(self, hidden_states: nn.Tensor, input_ids: nn.Tensor) -> nn.Tensor:
        """hidden_states[b, eos_position(b)] -> [B, C]."""
        b, n, c = hidden_states.shape
        eos = self.config.eos_token_id
        if eos == _LEGACY_EOS_TOKEN_ID or eos is None:
            key = input_ids
        else:
            key = op.equal(input_ids, op.full((1,), eos, "int32")).astype("int32")  # [B, N], 1 at EOS
        position = _argmax_last_axis(key)  # [B] int32, first maximum as torch's argmax
        flat_index = op.arange(0, b, dtype="int32") * n + position  # [B]
        flat = op.reshape(hidden_states, (b * n, c))  # [B*N, C]
        # "clip" like _Embedding: TOPI's default "fast" take warns at every compile; the index is in range
        return op.wrap_nested(relax.op.take(flat._expr, flat_index._expr, axis=0, mode="clip"), name="take")  # [B, C]


def _argmax_last_axis(x: nn.Tensor) -> nn.Tensor:
    """Index of the first maximum along the last axis, int32 (nn.op has no argmax; Relax has)."""
    from tvm import relax
    from tvm.relax.frontend.nn.core import wrap_nested

    return wrap_nested(relax.op.astype(relax.op.argmax(x._expr, axis=-1), "int32"), name="argmax")


def clip_spec(config: CLIPTextConfig, batch: int, seq_len: int = 77) -> dict:
    """Export spec of `CLIPTextModel.forward` for `batch` prompts of `seq_len` token ids (int32)."""
    if not 1 <= seq_len <= config.max_position_embeddings:
        raise SdcoreError(
            f"text encoder sequence length {seq_len} is outside 1..{config.max_position_embeddings} "
            "(max_position_embeddings)."
        )
    return {"forward": {"input_ids": nn.spec.Tensor([batch, seq_len], "int32")}}


def parity_layer_names(config: CLIPTextConfig, clip_skip: int | None = None) -> list[str]:
    """Submodules to compare with transformers: the embeddings, every computed encoder layer, and the
    final LayerNorm (only without clip_skip: with it, the reference applies final_layer_norm twice)."""
    num_layers = config.num_hidden_layers - (clip_skip or 0)
    names = ["text_model.embeddings"]
    names += [f"text_model.encoder.layers.{i}" for i in range(num_layers)]
    if not clip_skip:
        names.append("text_model.final_layer_norm")
    return names
