"""sdcore's Relax AutoencoderKL against diffusers' AutoencoderKL with the same random weights.

Every resnet, sampler, down/up block, the mid-block attention and resnets, conv_out, the moments
(vs `vae.encode(x).latent_dist.mean / .logvar`) and the decoded image (vs `vae.decode(z).sample`) are
compared with `sdcore.parity.compare` (thresholds in parity.TOLERANCES). Run with `-s` for the tables.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from sdcore.errors import SdcoreError
from sdcore.vae import SD_VAE_CONFIG, VAEConfig

torch = pytest.importorskip("torch", reason="torch is the reference's runtime (pip install -e .[test])")
diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference (pip install -e .[test])")

from sdcore.compile import build  # noqa: E402  (loads TVM, which imports torch when it is installed)
from sdcore.parity import build_tapped, compare, format_table, reference_taps  # noqa: E402
from sdcore.vae import AutoencoderKL, parity_layer_names, vae_spec  # noqa: E402


def _small_config(block_out_channels, **kwargs) -> VAEConfig:
    n = len(block_out_channels)
    return VAEConfig(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                     block_out_channels=block_out_channels, latent_channels=4, **kwargs)


def _reference(config: VAEConfig, seed: int):
    """diffusers' AutoencoderKL with seeded random weights; 1-D parameters (GroupNorm affine, biases)
    are perturbed so that no affine is the identity and a swapped weight/bias would show."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**dataclasses.asdict(config)).eval()
    with torch.no_grad():
        for p in vae.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return vae


def _state_dict(vae) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in vae.state_dict().items()}


def _split_names(config: VAEConfig) -> tuple[list[str], list[str]]:
    return parity_layer_names(config, ("encode",)), parity_layer_names(config, ("decode",))


def _check(rows, title: str) -> None:
    print()
    print(format_table(rows, title))
    bad = [r.name for r in rows if not r.ok]
    assert not bad, f"{title}: layers off the reference: {bad}"


def _run_encode(config, vae, params, x, tmp_path, name):
    enc_names, _ = _split_names(config)
    model = AutoencoderKL(config)
    batch, _, height, width = x.shape
    spec = vae_spec(config, batch, height, width, functions=("encode",))
    cm, n_out = build_tapped(model, spec, enc_names, function="encode", name=name, cache_dir=tmp_path,
                             use_cache=False)
    cm.set_params(params)
    outs = cm.encode(x)
    assert n_out == 2
    dist, ref = reference_taps(vae, enc_names, lambda: vae.encode(torch.from_numpy(x)).latent_dist)
    rows = [compare(n, ours, ref[n]) for n, ours in zip(enc_names, outs[2:])]
    rows.append(compare("latent_dist.mean", outs[0], dist.mean.numpy()))
    rows.append(compare("latent_dist.logvar", outs[1], dist.logvar.numpy()))
    return rows, outs


def _run_decode(config, vae, params, z, tmp_path, name, height, width):
    _, dec_names = _split_names(config)
    model = AutoencoderKL(config)
    spec = vae_spec(config, z.shape[0], height, width, functions=("decode",))
    cm, n_out = build_tapped(model, spec, dec_names, function="decode", name=name, cache_dir=tmp_path,
                             use_cache=False)
    cm.set_params(params)
    outs = cm.decode(z)
    assert n_out == 1
    image, ref = reference_taps(vae, dec_names, lambda: vae.decode(torch.from_numpy(z)).sample)
    rows = [compare(n, ours, ref[n]) for n, ours in zip(dec_names, outs[1:])]
    rows.append(compare("decode.sample", outs[0], image.numpy()))
    return rows


CASES = [
    # (config, batch, height, width): together every code path (conv_shortcut or not, 1 and 2 layers,
    # 1 and 2 samplers, square and non-square, with and without mid attention and quant convs).
    pytest.param(_small_config((32, 64), layers_per_block=1, norm_num_groups=8), 2, 64, 48, id="32-64_l1_g8_64x48"),
    pytest.param(_small_config((32, 64, 64), layers_per_block=2, norm_num_groups=16), 2, 32, 32,
                 id="32-64-64_l2_g16_32x32"),
    pytest.param(_small_config((32, 64), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,
                               use_quant_conv=False, use_post_quant_conv=False), 2, 24, 40,
                 id="32-64_l1_g8_noattn_noquant_24x40"),
]


@pytest.mark.parametrize("config,batch,height,width", CASES)
def test_vae_parity(config, batch, height, width, tmp_path):
    vae = _reference(config, seed=0)
    latent = config.latent_channels
    with torch.no_grad():
        # Push two logvar channels out of [-30, 20] so that the clamp is exercised.
        last = vae.quant_conv if config.use_quant_conv else vae.encoder.conv_out
        last.bias[latent] += 40.0
        last.bias[latent + 1] -= 40.0
    params = _state_dict(vae)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1.0, 1.0, (batch, config.in_channels, height, width)).astype(np.float32)

    rows, (mean, logvar, *_) = _run_encode(config, vae, params, x, tmp_path, "vae-encode-test")
    assert logvar.max() == 20.0 and logvar.min() == -30.0  # the clamp did act
    _check(rows, f"VAE encode {config.block_out_channels} {height}x{width}")

    f = config.downsample_factor
    z = rng.standard_normal((batch, latent, height // f, width // f)).astype(np.float32)
    rows = _run_decode(config, vae, params, z, tmp_path, "vae-decode-test", height, width)
    _check(rows, f"VAE decode {config.block_out_channels} {height}x{width}")


def test_decode_only_module(tmp_path):
    """functions=("decode",) holds exactly the decoder's weights and its plain build matches diffusers."""
    config = _small_config((32, 64), layers_per_block=2, norm_num_groups=8)
    vae = _reference(config, seed=2)
    params = _state_dict(vae)
    model = AutoencoderKL(config, functions=("decode",))
    names = sorted(n for n, _ in model.named_parameters())
    assert names == sorted(k for k in params if k.startswith(("decoder.", "post_quant_conv.")))

    cm = build(model, vae_spec(config, 1, 32, 48, functions=("decode",)), name="vae-decode-only",
               cache_dir=tmp_path, use_cache=False)
    cm.set_params({n: params[n] for n in cm.param_names})
    z = np.random.default_rng(3).standard_normal((1, 4, 16, 24)).astype(np.float32)
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(z)).sample.numpy()
    _check([compare("decode.sample", cm.decode(z), ref)], "VAE decode-only build")
    with pytest.raises(AttributeError):
        cm.vm["encode"]
    with pytest.raises(SdcoreError, match="built without 'encode'"):
        model.export_tvm(vae_spec(config, 1, 32, 48, functions=("encode",)))


def test_group_norm_large_groups(tmp_path):
    """A 1M-value group (the decoder's 512x512 stage): TVM's own group_norm is off by ~6e-4 there."""
    from tvm.relax.frontend import nn

    from sdcore.vae.blocks import GroupNorm

    class Norm(nn.Module):
        def __init__(self):
            self.norm = GroupNorm(32, 128, 1e-6, "float32")

        def forward(self, x):
            return self.norm(x)

    rng = np.random.default_rng(4)
    x = (3.0 + 2.0 * rng.standard_normal((1, 128, 512, 512))).astype(np.float32)  # an offset mean, as in the VAE
    w = (1.0 + 0.1 * rng.standard_normal(128)).astype(np.float32)
    b = (0.1 * rng.standard_normal(128)).astype(np.float32)
    cm = build(Norm(), {"forward": {"x": nn.spec.Tensor(x.shape, "float32")}}, name="vae-group-norm",
               cache_dir=tmp_path, use_cache=False)
    cm.set_params({"norm.weight": w, "norm.bias": b})
    ref = torch.nn.functional.group_norm(torch.from_numpy(x), 32, torch.from_numpy(w), torch.from_numpy(b), 1e-6)
    _check([compare("GroupNorm 128x512x512", cm.forward(x), ref.numpy())], "VAE GroupNorm, large groups")


def test_parameter_names_match_diffusers():
    for config in (SD_VAE_CONFIG, CASES[2].values[0]):
        vae = diffusers.AutoencoderKL(**dataclasses.asdict(config))
        ours = {n: tuple(int(s) for s in p.shape) for n, p in AutoencoderKL(config).named_parameters()}
        ref = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
        assert ours == ref


# ----------------------------------------------------------------------------------------------
# config and spec: no compilation


SD15_VAE_JSON = {  # stable-diffusion-v1-5/vae/config.json
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
}


def test_config_from_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SD15_VAE_JSON))
    config = VAEConfig.from_json(path)
    assert config == SD_VAE_CONFIG
    assert config.downsample_factor == 8 and config.scaling_factor == 0.18215 and config.shift_factor is None


def test_config_round_trips_diffusers():
    """What diffusers itself saves (with its bookkeeping keys) reads back to the same model."""
    ref = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                                  mid_block_add_attention=False)
    config = VAEConfig.from_dict(json.loads(json.dumps(dict(ref.config))))
    for key, value in dataclasses.asdict(config).items():
        assert json.dumps(value) == json.dumps(ref.config[key]), key
    assert config.mid_block_add_attention is False and config.norm_num_groups == 8


@pytest.mark.parametrize("change,message", [
    ({"attention_head_dim": 8}, "unknown keys: attention_head_dim"),
    ({"_class_name": "AutoencoderTiny"}, "'AutoencoderTiny' is not supported"),
    ({"down_block_types": ["AttnDownEncoderBlock2D"] * 4}, "'AttnDownEncoderBlock2D' is not supported"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "up_block_types has 3 entries"),
    ({"norm_num_groups": 24}, "not a multiple of norm_num_groups 24"),
    ({"act_fn": "gelu"}, "act_fn 'gelu' is not supported"),
    ({"layers_per_block": 0}, "layers_per_block must be a positive integer"),
])
def test_config_rejects(change, message):
    with pytest.raises(SdcoreError, match=message):
        VAEConfig.from_dict({**SD15_VAE_JSON, **change})


def test_spec_shapes_and_errors():
    spec = vae_spec(SD_VAE_CONFIG, 2, 512, 768)
    assert [tuple(int(s) for s in spec[f][k].shape) for f, k in (("encode", "x"), ("decode", "z"))] == \
        [(2, 3, 512, 768), (2, 4, 64, 96)]
    assert list(vae_spec(SD_VAE_CONFIG, 1, 64, 64, functions=("decode",))) == ["decode"]
    with pytest.raises(SdcoreError, match="multiple of 8"):
        vae_spec(SD_VAE_CONFIG, 1, 516, 512)
    with pytest.raises(SdcoreError, match="subset of"):
        vae_spec(SD_VAE_CONFIG, 1, 512, 512, functions=("sample",))


def test_import_stays_light():
    """Reading a VAE config must not load TVM (nor, through it, torch)."""
    code = ("import sys, sdcore.vae; sdcore.vae.VAEConfig(); "
            "assert not {'tvm', 'torch', 'diffusers'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# full size


@pytest.mark.slow
def test_vae_parity_sd_decode_512(tmp_path):
    """The SD1.x/SD2.x VAE decoder, random weights, 64x64 latents -> 512x512, batch 1, every block."""
    config = SD_VAE_CONFIG
    vae = _reference(config, seed=0)
    params = _state_dict(vae)
    z = np.random.default_rng(0).standard_normal((1, 4, 64, 64)).astype(np.float32)
    rows = _run_decode(config, vae, params, z, tmp_path, "vae-decode-sd", 512, 512)
    _check(rows, "SD VAE decode 512x512")
