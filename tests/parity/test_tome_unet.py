"""Token merging inside the compiled UNet against diffusers' UNet2DConditionModel patched by tomesd 0.1.3.

Same random weights on both sides; tomesd.apply_patch gets the same options as sdcore's ToMeConfig.
Every transformer block's output and the noise prediction are compared (fp32 thresholds of
sdcore.parity). Run with `-s` to see the tables.

Order. tomesd's merged sequence [unmerged sources | destinations] is laid out in an order that
comes from torch's unstable argsort, sdcore's in raster order (see test_tome_matching.py); attention,
cross-attention and the feed-forward do not care about the order of the tokens, and every token is
unmerged back to its place, so the block outputs must agree to float rounding.

Ties. The two sides' hidden states differ by float rounding (~1e-6 relative), so a matching decision
(the r-th strongest link against the next, each merged source's destination against its runner-up)
won by less than that could go either way. `_Recorder` measures every decision's margin on tomesd's
side and the test asserts it is above MARGIN: a failure there means the seed gives a near-tie, not
that the implementation is wrong.

Random destinations. sdcore takes them as the int32 input `tome_rand`, drawn on the host from a
seed; tomesd draws them with torch.randint inside its matching. The use_rand case feeds the same
draws to tomesd by standing in for `torch` inside tomesd.merge (`_Recorder.randint`).
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference is diffusers, which needs torch")
diffusers = pytest.importorskip("diffusers", reason="the reference is diffusers' UNet2DConditionModel")
tomesd = pytest.importorskip("tomesd", reason="the reference is tomesd 0.1.3")
pytest.importorskip("tomesd.merge", reason="the reference is tomesd 0.1.3")  # tomesd.merge below

from sdcore.errors import SdcoreError  # noqa: E402
from sdcore.parity import TOLERANCES, build_tapped, compare, format_table, reference_taps  # noqa: E402
from sdcore.tome import ToMeConfig, reference  # noqa: E402
from sdcore.tome.config import log_lines  # noqa: E402
from sdcore.unet import UNetConfig  # noqa: E402

# The tiny-sd1 preset's widths on three levels: transformer blocks at levels 0 (16x16 latent: 256
# tokens) and 1 (64 tokens), so max_downsample 1 and 2 differ, and a mid block at level 2 that
# never merges (tomesd's downsample 4).
TINY = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
    attention_head_dim=2,
)
BATCH, SEQ_LEN = 2, 16  # an even batch (cond + uncond), else tomesd turns use_rand off
# Several times the float32 drift between the two sides' hidden states at a block's input.
MARGIN = 2e-5
PSNR_FP32 = TOLERANCES["float32"]["min_psnr"]


@dataclasses.dataclass(frozen=True)
class Case:
    height: int
    width: int
    tome: ToMeConfig
    seed: int = 0

    @property
    def label(self) -> str:
        t = self.tome
        merges = "+".join(n for n, on in (("attn1", t.merge_attn), ("attn2", t.merge_crossattn),
                                          ("ff", t.merge_mlp)) if on)
        return (f"{self.height}x{self.width} ratio {t.ratio:g} md{t.max_downsample} "
                f"{'rand' if t.use_rand else 'top-left'} {merges}")


CASES = [
    Case(16, 16, ToMeConfig(ratio=0.5, max_downsample=1, use_rand=False)),
    # 15x9 -> 8x5: neither level divides by the 2x2 stride, so both have a source-only border
    Case(15, 9, ToMeConfig(ratio=0.6, max_downsample=2, use_rand=False)),
    Case(10, 16, ToMeConfig(ratio=0.3, max_downsample=2, use_rand=False, merge_crossattn=True, merge_mlp=True)),
    Case(15, 9, ToMeConfig(ratio=0.5, max_downsample=2, use_rand=True), seed=1),
]


def _config(kwargs: dict = TINY) -> UNetConfig:
    return UNetConfig.from_dict(json.loads(json.dumps(kwargs)))  # as read from config.json


def _reference(kwargs: dict, seed: int):
    """diffusers' UNet with seeded random weights, norm affines moved off their (1, 0) init."""
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**kwargs).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return ref


def _margin(metric: np.ndarray, w: int, h: int, sx: int, sy: int, r: int, rand_idx) -> float:
    """The smallest margin of a decision that changes the merge (see the module docstring)."""
    a_idx, b_idx = reference.partition(h, w, sx, sy, rand_idx)
    unit = metric.astype(np.float64)
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
    scores = unit[:, a_idx] @ unit[:, b_idx].transpose(0, 2, 1)  # [B, Ns, Nd]
    node_max = scores.max(axis=-1)  # [B, Ns]
    order = np.argsort(-node_max, axis=-1)
    ranked = np.take_along_axis(node_max, order, axis=-1)
    margin = np.inf
    if r < len(a_idx):
        margin = float((ranked[:, r - 1] - ranked[:, r]).min())
    if len(b_idx) > 1:
        top2 = np.sort(scores, axis=-1)[..., -2:]  # [B, Ns, 2]
        gaps = np.take_along_axis(top2[..., 1] - top2[..., 0], order[:, :r], axis=1)
        margin = min(margin, float(gaps.min()))
    return margin


class _Recorder:
    """Wraps tomesd's matching to measure its margins, and stands in for `torch` inside tomesd.merge
    so that torch.randint returns the given destinations, block after block."""

    def __init__(self, destinations: list[np.ndarray]):
        self.destinations = list(destinations)
        self.margins: list[float] = []
        self._original = tomesd.merge.bipartite_soft_matching_random2d

    def matching(self, metric, w, h, sx, sy, r, no_rand=False, generator=None):
        rand_idx = None if no_rand else self.destinations[0]
        if r > 0:
            self.margins.append(_margin(metric.numpy(), w, h, sx, sy, r, rand_idx))
        return self._original(metric, w, h, sx, sy, r, no_rand=no_rand, generator=generator)

    def randint(self, high, size, device=None, generator=None):
        idx = self.destinations.pop(0)
        assert tuple(size) == idx.shape, (size, idx.shape)
        assert idx.max() < high
        return torch.from_numpy(idx.astype(np.int64))

    def __getattr__(self, name):
        return getattr(torch, name)


def _run_case(case: Case, kwargs: dict, monkeypatch, cache_dir):
    from sdcore.unet.model import UNet2DConditionModel, tome_plans, unet_spec, unet_tome_inputs

    config = _config(kwargs)
    ref = _reference(kwargs, case.seed)
    model = UNet2DConditionModel(config, tome=case.tome)
    weights = {k: v.detach().numpy() for k, v in ref.state_dict().items()}

    rng = np.random.default_rng(case.seed)
    sample = rng.standard_normal((BATCH, config.in_channels, case.height, case.width), dtype=np.float32)
    timestep = np.array([981.25, 13.5], dtype=np.float32)
    text = rng.standard_normal((BATCH, SEQ_LEN, config.cross_attention_dims[0]), dtype=np.float32)

    plans = tome_plans(config, case.tome, BATCH, case.height, case.width)
    extra = unet_tome_inputs(config, case.tome, BATCH, case.height, case.width, seed=(case.seed, 0))
    assert bool(extra) == case.tome.use_rand
    destinations = []
    if extra:  # the flat input back into one [h//sy, w//sx, 1] array per merging block
        offset = 0
        for _, plan in plans:
            if plan.rand_shape is not None:
                size = int(np.prod(plan.rand_shape))
                destinations.append(extra[0][offset: offset + size].reshape(plan.rand_shape))
                offset += size
        assert offset == extra[0].size

    names = [name for name, _ in plans]
    start = time.perf_counter()
    compiled, n_out = build_tapped(model, unet_spec(config, BATCH, case.height, case.width, SEQ_LEN,
                                                    tome=case.tome),
                                   names, name="unet-tome-parity", cache_dir=cache_dir, use_cache=False)
    compile_s = time.perf_counter() - start
    compiled.set_params(weights)
    outputs = compiled.forward(sample, timestep, text, *extra)

    recorder = _Recorder(destinations)
    monkeypatch.setattr(tomesd.merge, "bipartite_soft_matching_random2d", recorder.matching)
    monkeypatch.setattr(tomesd.merge, "torch", recorder)
    t = case.tome
    tomesd.apply_patch(ref, ratio=t.ratio, max_downsample=t.max_downsample, sx=t.sx, sy=t.sy,
                       use_rand=t.use_rand, merge_attn=t.merge_attn, merge_crossattn=t.merge_crossattn,
                       merge_mlp=t.merge_mlp)
    result, taps = reference_taps(ref, names, lambda: ref(torch.from_numpy(sample), torch.from_numpy(timestep),
                                                          torch.from_numpy(text)).sample)
    assert not recorder.destinations, "tomesd drew fewer destinations than sdcore planned"
    assert len(recorder.margins) == sum(plan.merges for _, plan in plans), "tomesd merged other blocks"
    margins = iter(recorder.margins)
    block_margins = [next(margins) if plan.merges else np.inf for _, plan in plans]  # one per block

    rows = [compare(f"{name} ({plan.tokens}->{plan.tokens_after}, margin {m:.0e})" if plan.merges else name,
                    out, taps[name])
            for (name, plan), m, out in zip(plans, block_margins, outputs[n_out:])]
    rows.append(compare("noise prediction", outputs[0], result.numpy()))
    print(format_table(rows, title=f"UNet + ToMe {case.label}: compile {compile_s:.1f} s, "
                                   f"smallest matching margin {min(recorder.margins):.1e}"))
    return rows, block_margins


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_tome_unet_parity(case, monkeypatch, tmp_path):
    rows, margins = _run_case(case, TINY, monkeypatch, tmp_path)
    assert min(margins) > MARGIN, f"near-tie in the matching ({min(margins):.1e}): choose another seed"
    bad = [r.name for r in rows if not r.ok]
    assert not bad, f"outputs off diffusers+tomesd: {bad}"


# ----------------------------------------------------------------------------------------------
# the graph and the plan (no compilation)


def _script(tome: ToMeConfig | None, height: int = 16, width: int = 16, batch: int = BATCH) -> str:
    from sdcore.unet.model import UNet2DConditionModel, unet_spec

    config = _config()
    spec = unet_spec(config, batch, height, width, SEQ_LEN, tome=tome)
    ir_mod, _ = UNet2DConditionModel(config, tome=tome).export_tvm(spec=spec)
    return ir_mod.script(show_meta=True)  # what sdcore.compile.build hashes into the cache key


def test_ratio_zero_is_the_plain_graph():
    plain = _script(None)
    assert _script(ToMeConfig(ratio=0.0)) == plain
    assert _script(ToMeConfig(ratio=0.5, merge_attn=False)) == plain  # merges nothing
    # a block with r = int(N * ratio) = 0 does not merge either: 2x2 latent, r = int(4 * 0.2) = 0
    assert _script(ToMeConfig(ratio=0.2), 2, 2) == _script(None, 2, 2)
    assert "argsort" not in plain and "scatter_elements" not in plain


def test_options_change_the_cache_key():
    options = [
        ToMeConfig(ratio=0.5, use_rand=False),
        ToMeConfig(ratio=0.6, use_rand=False),
        ToMeConfig(ratio=0.5, max_downsample=2, use_rand=False),
        ToMeConfig(ratio=0.5, use_rand=True),
        ToMeConfig(ratio=0.5, sx=1, sy=2, use_rand=False),
        ToMeConfig(ratio=0.5, use_rand=False, merge_mlp=True),
    ]
    scripts = [_script(None)] + [_script(t) for t in options]
    assert len(set(scripts)) == len(scripts)
    assert len({t.tag() for t in options}) == len(options) and ToMeConfig(ratio=0).tag() == ""


def test_plan_log_and_inputs():
    from sdcore.unet.model import tome_plans, transformer_blocks, unet_spec, unet_tome_inputs

    config = _config()
    tome = ToMeConfig(ratio=0.5, max_downsample=2)
    assert [n for n, _ in transformer_blocks(config, 15, 9)] == [
        "down_blocks.0.attentions.0.transformer_blocks.0", "down_blocks.1.attentions.0.transformer_blocks.0",
        "mid_block.attentions.0.transformer_blocks.0", "up_blocks.1.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.1.transformer_blocks.0", "up_blocks.2.attentions.0.transformer_blocks.0",
        "up_blocks.2.attentions.1.transformer_blocks.0"]
    plans = tome_plans(config, tome, 2, 15, 9)
    assert log_lines(plans) == [
        "down_blocks.0.attentions.0.transformer_blocks.0: 135 -> 68 tokens",
        "down_blocks.1.attentions.0.transformer_blocks.0: 40 -> 20 tokens",
        "up_blocks.1.attentions.0.transformer_blocks.0: 40 -> 20 tokens",
        "up_blocks.1.attentions.1.transformer_blocks.0: 40 -> 20 tokens",
        "up_blocks.2.attentions.0.transformer_blocks.0: 135 -> 68 tokens",
        "up_blocks.2.attentions.1.transformer_blocks.0: 135 -> 68 tokens"]
    assert tome.tag() == "tome0.5-md2-2x2-rand-attn1"

    # one [h//2, w//2] draw per merging block: 3 x (7x4) at level 0, 3 x (4x2) at level 1
    (rand,) = unet_tome_inputs(config, tome, 2, 15, 9, seed=(3, 0))
    assert rand.shape == (108,) and rand.dtype == np.int32 and 0 <= rand.min() and rand.max() < 4
    assert np.array_equal(rand, unet_tome_inputs(config, tome, 2, 15, 9, seed=(3, 0))[0])
    assert not np.array_equal(rand, unet_tome_inputs(config, tome, 2, 15, 9, seed=(3, 1))[0])
    assert unet_spec(config, 2, 15, 9, tome=tome)["forward"]["tome_rand"].shape == [108]
    # an odd batch turns use_rand off, as in tomesd: no input
    assert unet_tome_inputs(config, tome, 1, 15, 9, seed=0) == ()
    assert "tome_rand" not in unet_spec(config, 1, 15, 9, tome=tome)["forward"]
    assert unet_tome_inputs(config, None, 2, 15, 9, seed=0) == ()


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=0.8), "above the maximum 0.75 for a 2x2 stride"),
    (dict(ratio=0.6, sx=2, sy=1), "above the maximum 0.5 for a 2x1 stride"),
])
def test_ratio_too_large(kwargs, message):
    from sdcore.unet.model import UNet2DConditionModel

    with pytest.raises(SdcoreError, match=message):
        UNet2DConditionModel(_config(), tome=ToMeConfig(**kwargs))


def test_grid_too_small_for_a_window():
    from sdcore.unet.model import unet_spec

    # 4x8 latent, max_downsample 4: the level-2 blocks see a 1x2 grid, smaller than a 2x2 window
    with pytest.raises(SdcoreError, match="smaller than one 2x2 window"):
        unet_spec(_config(), 2, 4, 8, tome=ToMeConfig(ratio=0.5, max_downsample=4))


# ----------------------------------------------------------------------------------------------
# full size


@pytest.mark.slow
def test_tome_unet_parity_sd15(monkeypatch, tmp_path):
    """SD1.5's UNet shape with random weights, batch 2, 64x64 latents (512x512), ratio 0.5, top-left.

    At 4096 tokens, random data gives thousands of matching decisions, some won by less than the
    fp32 drift between the two sides (5e-8 at seed 0, against ~1e-6): such a decision may go the
    other way and move a few tokens' outputs by ~1e-3 relative. So the fp32 thresholds hold for every
    output up to the first block with a near-tie; from there on, every output must still keep the
    fp32 PSNR (a flipped near-tie costs ~90 dB; a wrong merge gives 35-40 dB, as ToMe itself does).
    """
    from sdcore.presets import preset

    sd15 = {k: v for k, v in preset("sd15")["unet"].items() if k != "sample_size"}
    case = Case(64, 64, ToMeConfig(ratio=0.5, max_downsample=1, use_rand=False))
    rows, margins = _run_case(case, sd15, monkeypatch, tmp_path)
    tied = np.cumsum([m <= MARGIN for m in margins] + [0]) > 0  # at or after a block with a near-tie
    bad = [r.name for r, after_tie in zip(rows, tied) if not (r.psnr >= PSNR_FP32 if after_tie else r.ok)]
    assert not bad, f"outputs off diffusers+tomesd: {bad}"
