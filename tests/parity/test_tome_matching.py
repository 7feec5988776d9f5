"""ToMe bipartite soft matching: the NumPy reference vs tomesd 0.1.3, the Relax graph vs the reference.

Each case merges random tokens, mixes the merged tokens (a token-wise op plus their mean: like
attention, it lets tokens interact but does not care about their order), unmerges, and compares both
the merged tensor and the final one.

Order. tomesd lays the merged sequence out as [unmerged sources | destinations] in an order that
comes from torch's *unstable* argsort of a 0/-1 mask (an implementation artefact: it is not raster
order); sdcore uses raster order. Attention, cross-attention and the feed-forward are all equivariant
to a permutation of the tokens, so only the grouping matters. The merged tensors are therefore
compared through the permutation that the two unmerges define (`_assert_same_merge`): it must be a
bijection that keeps unmerged tokens unmerged and maps each merged group onto the same group.

Ties. Equal similarities make argsort/argmax order implementation-defined, so ties are not tested:
the inputs are random floats, and `_inputs` asserts that every decision that changes the result
(which source is the r-th strongest, which destination each merged source picks) wins by more than
MARGIN, several times float32 rounding, so all implementations must agree. Random data cannot do
that at 135x240: its 24360 strongest-link values crowd within ~0.1, leaving ~1e-6 between the r-th
and the next whatever the seed. That case therefore plants its matches: r sources are copies of
random destinations (cosine 1) and the others stay random (best cosine below ~0.997), which puts
~1e-3 at every decision while still exercising the same code. Exact float32 ties among the
unmerged sources remain; they only reorder them, which the permutation check absorbs.

The random destination index: tomesd draws it with `torch.randint(sx*sy, (h//sy, w//sx, 1),
generator=g)`. Replaying that call on a generator seeded identically yields the same index, which
is fed to sdcore's functions; tomesd gets a fresh generator with the same seed.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np
import pytest

from sdcore.errors import SdcoreError
from sdcore.parity import compare, format_table
from sdcore.tome import ToMeConfig, random_destination_indices, reference

torch = pytest.importorskip("torch")
tomesd_merge = pytest.importorskip("tomesd.merge")
tomesd_patch = pytest.importorskip("tomesd.patch")

# Float32 cosines of unit vectors with C <= 16 terms are within ~5e-7 of the exact value (a few ulps
# near 1, summed over C products), so a decision won by more than this is the same in every
# implementation.
MARGIN = 2e-6


@dataclasses.dataclass(frozen=True)
class Case:
    h: int
    w: int
    sx: int
    sy: int
    ratio: float
    rand: bool
    batch: int = 2
    channels: int = 16
    seed: int = 0
    planted: bool = False  # see _inputs

    @property
    def n(self) -> int:
        return self.h * self.w

    @property
    def r(self) -> int:
        return int(self.n * self.ratio)

    @property
    def num_unmerged_src(self) -> int:
        return self.n - (self.h // self.sy) * (self.w // self.sx) - self.r

    @property
    def label(self) -> str:
        return (f"{self.h}x{self.w} s{self.sx}{self.sy} r={self.r} {'rand' if self.rand else 'top-left'}"
                f" B={self.batch}")


CASES = [
    Case(16, 16, 2, 2, 0.75, False),  # the maximum ratio on a divisible grid: every source merges
    Case(15, 9, 2, 2, 0.5, True, seed=1),  # 15 and 9 not divisible by 2: a source-only border
    Case(15, 9, 1, 2, 0.3, True, seed=2),
    Case(9, 15, 2, 2, 0.75, False, seed=3),  # the maximum ratio, but a border of extra sources
    Case(8, 12, 2, 1, 0.1, True, batch=1, seed=4),
    Case(6, 10, 2, 2, 1 / 60, True, seed=5),  # r == 1
    # The first level of a 1920x1080 image (latent 135x240). Kept to one batch of 8 channels: the
    # score matrix alone is 24360 x 8040. Planted matches: see the module docstring.
    Case(135, 240, 2, 2, 0.5, True, batch=1, channels=8, seed=6, planted=True),
]
IDS = [c.label for c in CASES]


def _mix(y, mean):
    """The stand-in for attention between merge and unmerge: per-token op plus the tokens' mean."""
    return y * 2.0 + mean(y)


@functools.lru_cache(maxsize=None)
def _inputs(case: Case):
    """(metric, x, rand_idx) for a case, after checking that no decision is a near-tie."""
    rng = np.random.default_rng(case.seed)
    metric = rng.standard_normal((case.batch, case.n, case.channels)).astype(np.float32)
    x = rng.standard_normal((case.batch, case.n, case.channels)).astype(np.float32)
    rand_idx = None
    if case.rand:
        g = torch.Generator().manual_seed(case.seed)
        rand_idx = torch.randint(case.sx * case.sy, (case.h // case.sy, case.w // case.sx, 1),
                                 generator=g).numpy().astype(np.int32)

    a_idx, b_idx = reference.partition(case.h, case.w, case.sx, case.sy, rand_idx)
    if case.planted:
        # r sources become copies of random destinations (cosine 1), the rest stay random.
        for b in range(case.batch):
            copies = rng.choice(a_idx, size=case.r, replace=False)
            metric[b, copies] = metric[b, rng.choice(b_idx, size=case.r)]
    unit = torch.nn.functional.normalize(torch.from_numpy(metric), dim=-1)
    scores = unit[:, a_idx] @ unit[:, b_idx].transpose(1, 2)  # [B, Ns, Nd]
    top2 = scores.topk(min(2, len(b_idx)), dim=-1).values  # [B, Ns, 1 or 2]
    del scores
    strongest = top2[..., 0].sort(dim=-1, descending=True)  # node_max, strongest first: [B, Ns]
    margin = float("inf")
    if case.r < len(a_idx):  # the r-th strongest link against the first one left out
        margin = float((strongest.values[:, case.r - 1] - strongest.values[:, case.r]).min())
    if len(b_idx) > 1:  # each merged source's destination against its runner-up
        gaps = torch.take_along_dim(top2[..., 0] - top2[..., 1], strongest.indices[:, : case.r], dim=1)
        margin = min(margin, float(gaps.min()))
    assert margin > MARGIN, f"{case.label}: the data has a near-tie ({margin:.2e}); choose another seed"
    return metric, x, rand_idx


def _probe(case: Case) -> np.ndarray:
    """Merged-sequence positions as a 1-channel tensor: unmerge(probe) tells where each token went."""
    m = case.n - case.r
    return np.broadcast_to(np.arange(m, dtype=np.float32)[None, :, None], (case.batch, m, 1)).copy()


def _run_tomesd(case: Case):
    metric, x, _ = _inputs(case)
    generator = torch.Generator().manual_seed(case.seed) if case.rand else None
    merge, unmerge = tomesd_merge.bipartite_soft_matching_random2d(
        torch.from_numpy(metric), case.w, case.h, case.sx, case.sy, case.r, no_rand=not case.rand,
        generator=generator)
    merged = merge(torch.from_numpy(x))
    out = unmerge(_mix(merged, lambda y: y.mean(dim=1, keepdim=True)))
    positions = unmerge(torch.from_numpy(_probe(case)))
    return merged.numpy(), out.numpy(), positions.numpy()[..., 0].astype(np.int64)


@functools.lru_cache(maxsize=None)
def _run_reference(case: Case):
    metric, x, rand_idx = _inputs(case)
    merge, unmerge = reference.bipartite_soft_matching_random2d(metric, case.w, case.h, case.sx, case.sy,
                                                                case.r, rand_idx)
    merged = merge(x)
    out = unmerge(_mix(merged, lambda y: y.mean(axis=1, keepdims=True)))
    return merged, out, unmerge(_probe(case))[..., 0].astype(np.int64)


def _assert_same_merge(label: str, case: Case, ours, ref, ordered: bool) -> None:
    """Compare (merged, final, positions) of two implementations; see the module docstring."""
    (merged, out, pos), (ref_merged, ref_out, ref_pos) = ours, ref
    n_unm, size = case.num_unmerged_src, case.n - case.r
    assert merged.shape == ref_merged.shape == (case.batch, size, case.channels), label
    aligned = np.empty_like(ref_merged)
    for b in range(case.batch):
        sigma = np.full(size, -1)
        sigma[pos[b]] = ref_pos[b]  # our merged position -> the reference's, via the tokens in it
        assert np.array_equal(sigma[pos[b]], ref_pos[b]), f"{label}: tokens grouped differently"
        assert np.array_equal(np.sort(sigma), np.arange(size)), f"{label}: not a bijection"
        assert (sigma[:n_unm] < n_unm).all() and (sigma[n_unm:] >= n_unm).all(), f"{label}: layout differs"
        if ordered:
            assert np.array_equal(sigma, np.arange(size)), f"{label}: merged order differs"
        aligned[b] = ref_merged[b, sigma]
    rows = [compare(f"{label} merge", merged, aligned), compare(f"{label} unmerge(mix(merge))", out, ref_out)]
    print(format_table(rows))
    assert all(row.ok for row in rows), label


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_matches_tomesd(case):
    _assert_same_merge(f"numpy vs tomesd {case.label}", case, _run_reference(case), _run_tomesd(case),
                       ordered=False)


HALF = CASES[1]  # also run in float16: the matching upcasts, merge/unmerge stay in float16


def _harness_method(case: Case):
    """An exported function for a case: (merge(x), unmerge(mix(merge(x))), unmerge(position probe))."""
    from tvm.relax.frontend.nn import op

    from sdcore.tome.merge import bipartite_soft_matching_random2d

    def body(metric, x, probe, rand_idx):
        merge, unmerge = bipartite_soft_matching_random2d(metric, case.w, case.h, case.sx, case.sy, case.r,
                                                          rand_idx)
        merged = merge(x)
        size = case.n - case.r
        out = unmerge(_mix(merged, lambda y: op.sum(y, axis=1, keepdims=True) * (1.0 / size)))
        return merged, out, unmerge(probe)

    if case.rand:
        return lambda self, metric, x, probe, rand_idx: body(metric, x, probe, rand_idx)
    return lambda self, metric, x, probe: body(metric, x, probe, None)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """All cases in one module, so one build serves them all."""
    from tvm.relax.frontend import nn

    from sdcore.compile import build

    functions = {f"case{i}": (c, "float32") for i, c in enumerate(CASES)}
    functions["half"] = (HALF, "float16")
    methods = {name: _harness_method(c) for name, (c, _) in functions.items()}
    harness = type("ToMeHarness", (nn.Module,), methods)
    spec = {}
    for name, (c, dtype) in functions.items():
        spec[name] = {
            "metric": nn.spec.Tensor((c.batch, c.n, c.channels), dtype),
            "x": nn.spec.Tensor((c.batch, c.n, c.channels), dtype),
            "probe": nn.spec.Tensor((c.batch, c.n - c.r, 1), dtype),
        }
        if c.rand:
            spec[name]["rand_idx"] = nn.spec.Tensor((c.h // c.sy, c.w // c.sx, 1), "int32")
    start = time.perf_counter()
    model = build(harness(), spec, name="tome_harness", cache_dir=tmp_path_factory.mktemp("tome"))
    print(f"built {len(functions)} ToMe cases in {time.perf_counter() - start:.1f} s")
    model.set_params({})
    return model


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_relax_matches_reference(compiled, index):
    case = CASES[index]
    metric, x, rand_idx = _inputs(case)
    inputs = [metric, x, _probe(case)] + ([rand_idx] if case.rand else [])
    merged, out, pos = compiled.run(f"case{index}", *inputs)
    # Same raster-order partition and a stable strongest-first order: identical layout, except where
    # exact float32 ties among node_max reorder unmerged sources (only the 135x240 case has them).
    _assert_same_merge(f"relax vs numpy {case.label}", case, (merged, out, pos[..., 0].astype(np.int64)),
                       _run_reference(case), ordered=case.n < 10_000)


def test_relax_float16(compiled):
    metric, x, rand_idx = _inputs(HALF)
    metric, x = metric.astype(np.float16), x.astype(np.float16)
    merged, out, pos = compiled.half(metric, x, _probe(HALF).astype(np.float16), rand_idx)
    merge, unmerge = reference.bipartite_soft_matching_random2d(metric.astype(np.float32), HALF.w, HALF.h,
                                                                HALF.sx, HALF.sy, HALF.r, rand_idx)
    ref_merged = merge(x.astype(np.float32))
    ref_out = unmerge(_mix(ref_merged, lambda y: y.mean(axis=1, keepdims=True)))
    assert merged.dtype == out.dtype == np.float16
    assert np.array_equal(pos[..., 0], unmerge(_probe(HALF))[..., 0]), "float16 matched differently"
    rows = [compare("relax float16 merge", merged, ref_merged, dtype="float16"),
            compare("relax float16 unmerge(mix(merge))", out, ref_out, dtype="float16")]
    print(format_table(rows))
    assert all(row.ok for row in rows)


def test_random_destination_indices():
    idx = random_destination_indices(7, 15, 9, 2, 2)
    assert idx.shape == (7, 4, 1) and idx.dtype == np.int32
    assert idx.min() >= 0 and idx.max() < 4
    assert np.array_equal(idx, random_destination_indices(7, 15, 9, 2, 2))
    assert not np.array_equal(random_destination_indices((7, 0, 3), 64, 64, 2, 2),
                              random_destination_indices((7, 1, 3), 64, 64, 2, 2))


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=0.76), "above the maximum 0.75"),
    (dict(ratio=0.6, sx=2, sy=1), "above the maximum 0.5"),
    (dict(ratio=0.1, sx=1, sy=1), "above the maximum 0"),
    (dict(ratio=-0.1), "negative"),
    (dict(max_downsample=3), "max_downsample=3"),
    (dict(sx=0), "at least 1"),
    (dict(sy=2.0), "sy must be an integer"),
    (dict(use_rand=1), "use_rand"),
])
def test_config_refuses(kwargs, message):
    with pytest.raises(SdcoreError, match=message):
        ToMeConfig(**kwargs)


def _tomesd_plan(config: ToMeConfig, latent, tokens, batch):
    """What tomesd's compute_merge hands to the matching: (w, h, r, use_rand), or None."""
    calls = []

    def record(x, w, h, sx, sy, r, no_rand=False, generator=None):
        calls.append((w, h, r, not no_rand))
        return tomesd_merge.do_nothing, tomesd_merge.do_nothing

    info = {"size": latent, "args": dict(dataclasses.asdict(config), generator=None)}
    original = tomesd_patch.merge.bipartite_soft_matching_random2d
    tomesd_patch.merge.bipartite_soft_matching_random2d = record
    try:
        tomesd_patch.compute_merge(torch.zeros(batch, tokens, 1), info)
    finally:
        tomesd_patch.merge.bipartite_soft_matching_random2d = original
    return calls[0] if calls and calls[0][2] > 0 else None


def _plan_for_level(config, latent_size, level, batch):
    """The plan of a block `level` stride-2 convolutions below the latent (a ceil(h/2) x ceil(w/2)
    grid per level), as sdcore.unet.model.tome_plans asks for it."""
    grid_h, grid_w = latent_size
    for _ in range(level):
        grid_h, grid_w = (grid_h + 1) // 2, (grid_w + 1) // 2
    return config.plan_for_tokens(latent_size, grid_h * grid_w, batch, level=level)


@pytest.mark.parametrize("latent", [(64, 64), (96, 64), (64, 112), (72, 128), (135, 240), (15, 9)])
def test_plan_matches_tomesd(latent):
    for max_downsample in (1, 2, 4, 8):
        for batch in (1, 2):
            config = ToMeConfig(ratio=0.4, max_downsample=max_downsample)
            for level in range(4):
                try:
                    plan = _plan_for_level(config, latent, level, batch)
                except SdcoreError:
                    continue  # tomesd fails on these: test_plan_refuses_what_tomesd_cannot_do
                theirs = _tomesd_plan(config, latent, plan.tokens, batch)
                ours = (plan.w, plan.h, plan.r, plan.use_rand) if plan.merges else None
                assert ours == theirs, (latent, max_downsample, batch, level)


def test_plan_refuses_what_tomesd_cannot_do():
    config = ToMeConfig(ratio=0.5, max_downsample=8)
    # 15x9 latent, level 3: a 2x2-token block that tomesd's rounding takes for 3x2.
    with pytest.raises(SdcoreError, match="grid estimate 3x2"):
        _plan_for_level(config, (15, 9), 3, 2)
    info = {"size": (15, 9), "args": dict(dataclasses.asdict(config), generator=None)}
    with pytest.raises(RuntimeError):
        merge = tomesd_patch.compute_merge(torch.randn(2, 4, 8), info)[0]
        merge(torch.randn(2, 4, 8))
    # 8x16 latent, level 3: a 1x2 grid holds no whole 2x2 window (tomesd: max over an empty axis).
    with pytest.raises(SdcoreError, match="smaller than one 2x2 window"):
        _plan_for_level(config, (8, 16), 3, 2)


def test_plan_fields():
    config = ToMeConfig(ratio=0.5)
    plan = _plan_for_level(config, (135, 240), 0, 2)
    assert (plan.tokens, plan.h, plan.w, plan.r, plan.tokens_after, plan.merges) == (32400, 135, 240, 16200,
                                                                                     16200, True)
    assert not _plan_for_level(config, (135, 240), 1, 2).merges
    assert _plan_for_level(config, (64, 64), 0, 1).use_rand is False  # odd batch, as tomesd
