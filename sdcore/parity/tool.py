"""`python -m sdcore.parity MODEL_DIR` (also `sdcore parity`): layer-by-layer check of a converted model.

Runs every network of the converted model in sdcore (a debug build that also returns each block's
output) and in the reference implementation (diffusers' UNet2DConditionModel / AutoencoderKL,
transformers' CLIPTextModel) with the SAME weights, read from MODEL_DIR, and the same random
inputs, then prints one table per network: max abs error, max relative error and PSNR per layer,
against the thresholds in sdcore.parity.TOLERANCES. Exit status 0 when every layer is within them,
1 otherwise. Needs torch, diffusers and transformers (`pip install "sdcore[test]"`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from sdcore import weights
from sdcore.errors import SdcoreError, UsageError
from sdcore.parity.scores import compare, format_table
from sdcore.parity.taps import build_tapped, reference_taps
from sdcore.pipeline.request import default_image_size

COMPONENTS = ("text_encoder", "unet", "vae")


def _references():
    try:
        import diffusers
        import torch
        import transformers
    except ImportError as err:
        raise SdcoreError(f"the parity tool needs the reference packages ({err.name} is missing): "
                          f"pip install 'sdcore[test]'.") from None
    return torch, diffusers, transformers


def _load_reference(torch, component: str, module, state: dict):
    """Load sdcore's state dict into the torch reference, strictly (but for weights.is_ignored_key)."""
    if component == "text_encoder" and not hasattr(module, "text_model"):  # transformers 5: no text_model level
        state = {k.removeprefix(weights.TEXT_MODEL_LEVEL): v for k, v in state.items()}
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not weights.is_ignored_key(component, k)]
    if missing or unexpected:
        raise SdcoreError(f"the reference model does not take these weights: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}.")
    return module.eval()


def _cast(state: dict, dtype: str) -> dict:
    return {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in state.items()}


def check_text_encoder(model_dir: Path, cache_dir, seed: int, target="llvm", dtype: str = "float32") -> list:
    torch, _diffusers, transformers = _references()
    from sdcore.clip.model import CLIPTextModel, clip_spec, parity_layer_names
    from sdcore.tokenizer import CLIPTokenizer

    config_dict, state = weights.load_component(model_dir, "text_encoder")
    config = weights.model_classes("text_encoder")[0].from_dict(config_dict)
    ref = _load_reference(torch, "text_encoder", transformers.CLIPTextModel(transformers.CLIPTextConfig(**config_dict)),
                          state)
    holder = ref
    if not hasattr(ref, "text_model"):
        holder = torch.nn.Module()
        holder.text_model = ref
    tokenizer = CLIPTokenizer.from_dir(model_dir / "tokenizer")
    ids = tokenizer(["a photograph of an astronaut riding a horse", ""]).astype(np.int32)  # [2, 77]

    names = parity_layer_names(config)
    compiled, n_out = build_tapped(CLIPTextModel(config, dtype=dtype), clip_spec(config, *ids.shape), names,
                                   name="parity-text_encoder", cache_dir=cache_dir, target=target)
    compiled.set_params(_cast(state, dtype))
    outs = compiled.forward(ids)
    result, taps = reference_taps(holder, names, lambda: ref(input_ids=torch.from_numpy(ids.astype(np.int64))))
    rows = [compare(n, o, taps[n], dtype) for n, o in zip(names, outs[n_out:])]
    rows.append(compare("last_hidden_state", outs[0], result.last_hidden_state.numpy(), dtype))
    return rows


def check_unet(model_dir: Path, cache_dir, seed: int, height: int, width: int, batch: int, target="llvm",
               dtype: str = "float32") -> list:
    torch, diffusers, _transformers = _references()
    from sdcore.unet.model import UNet2DConditionModel, parity_layer_names, unet_spec

    config_dict, state = weights.load_component(model_dir, "unet")
    config = weights.model_classes("unet")[0].from_dict(config_dict)
    ref = _load_reference(torch, "unet", diffusers.UNet2DConditionModel.from_config(config_dict), state)
    rng = np.random.default_rng(seed)
    h, w = height // 8, width // 8
    sample = rng.standard_normal((batch, config.in_channels, h, w), dtype=np.float32)
    timestep = np.linspace(981.0, 21.0, batch).astype(np.float32)
    text = rng.standard_normal((batch, 77, config.cross_attention_dims[0]), dtype=np.float32)

    names = parity_layer_names(config)
    compiled, n_out = build_tapped(UNet2DConditionModel(config, dtype=dtype),
                                   unet_spec(config, batch, h, w, 77, dtype=dtype), names,
                                   name=f"parity-unet-{h}x{w}", cache_dir=cache_dir, target=target)
    compiled.set_params(_cast(state, dtype))
    outs = compiled.forward(sample, timestep, text)
    result, taps = reference_taps(ref, names, lambda: ref(torch.from_numpy(sample), torch.from_numpy(timestep),
                                                          torch.from_numpy(text)).sample)
    rows = [compare(n, o, taps[n], dtype) for n, o in zip(names, outs[n_out:])]
    rows.append(compare("noise prediction", outs[0], result.numpy(), dtype))
    return rows


def check_vae(model_dir: Path, cache_dir, seed: int, height: int, width: int, target="llvm") -> list:
    """Encode and decode, float32 on every target (as the pipeline runs the VAE)."""
    torch, diffusers, _transformers = _references()
    from sdcore.vae.model import AutoencoderKL, parity_layer_names, vae_spec

    config_dict, state = weights.load_component(model_dir, "vae")
    config = weights.model_classes("vae")[0].from_dict(config_dict)
    ref = _load_reference(torch, "vae", diffusers.AutoencoderKL.from_config(config_dict), state)
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (1, 3, height, width)).astype(np.float32)
    rows = []
    for function in ("encode", "decode"):
        model = AutoencoderKL(config, functions=(function,))
        names = parity_layer_names(config, functions=(function,))
        spec = vae_spec(config, 1, height, width, functions=(function,))
        compiled, n_out = build_tapped(model, spec, names, function=function,
                                       name=f"parity-vae-{function}-{height}x{width}", cache_dir=cache_dir,
                                       target=target)
        compiled.set_params({n: state[n] for n in compiled.param_names})
        if function == "encode":
            outs = compiled.encode(image)
            dist, taps = reference_taps(ref, names, lambda: ref.encode(torch.from_numpy(image)).latent_dist)
            finals = [compare("latent_dist.mean", outs[0], dist.mean.numpy()),
                      compare("latent_dist.logvar", outs[1], dist.logvar.numpy())]
            latents = dist.mean.numpy()
        else:
            outs = compiled.decode(latents)
            decoded, taps = reference_taps(ref, names,
                                           lambda z=latents: ref.decode(torch.from_numpy(z)).sample)
            finals = [compare("decode.sample", outs[0], decoded.numpy())]
        rows += [compare(n, o, taps[n]) for n, o in zip(names, outs[n_out:])] + finals
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdcore.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="converted sdcore model directory")
    parser.add_argument("--components", default=",".join(COMPONENTS),
                        help=f"comma-separated subset of {','.join(COMPONENTS)} (default: all)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's size)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with guidance)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--cache-dir", type=Path, default=None, help="compile cache (default ~/.cache/sdcore)")
    parser.add_argument("--target", default="cpu", choices=["cpu", "llvm", "cuda", "auto"],
                        help="where sdcore runs (the reference runs in float32 on the CPU)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16"],
                        help="UNet and text encoder precision (default: float16 on cuda, float32 on the CPU; "
                             "float16 is scored with the float16 thresholds)")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except SdcoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def _run(args) -> int:
    model_dir = args.model_dir
    weights.read_model_info(model_dir)  # a clear error for a folder that is not a converted model
    components = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise UsageError(f"unknown component(s) {unknown}: choose from {', '.join(COMPONENTS)}.")
    unet_config = weights.model_classes("unet")[0].from_dict(weights.read_config(model_dir, "unet"))
    vae_config = weights.model_classes("vae")[0].from_dict(weights.read_config(model_dir, "vae"))
    default_height, default_width = default_image_size(unet_config, vae_config.downsample_factor)
    width, height = args.width or default_width, args.height or default_height
    if width % 8 or height % 8 or width < 8 or height < 8:
        raise UsageError(f"--width/--height must be positive multiples of 8, got {width}x{height}.")
    if not 1 <= args.batch <= 16:
        raise UsageError(f"--batch must be between 1 and 16, got {args.batch}.")

    from sdcore.compile import make_target

    target = make_target(args.target)
    dtype = args.dtype or ("float16" if target.kind.name == "cuda" else "float32")
    if dtype == "float16" and target.kind.name != "cuda":
        raise UsageError("float16 needs --target cuda: sdcore's CPU kernels are float32.")
    all_ok = True
    for component in components:
        start = time.perf_counter()
        if component == "text_encoder":
            rows = check_text_encoder(model_dir, args.cache_dir, args.seed, target, dtype)
            what = f"2 prompts x 77 tokens, {dtype}"
        elif component == "unet":
            rows = check_unet(model_dir, args.cache_dir, args.seed, height, width, args.batch, target, dtype)
            what = f"batch {args.batch}, {height // 8}x{width // 8} latents, {dtype}"
        else:
            rows = check_vae(model_dir, args.cache_dir, args.seed, height, width, target)
            what = f"{width}x{height}, float32"
        bad = [r.name for r in rows if not r.ok]
        all_ok &= not bad
        print(format_table(rows, title=f"{component} ({what}; {time.perf_counter() - start:.0f} s): "
                                       f"{len(rows) - len(bad)}/{len(rows)} layers within tolerance"))
        print()
    print("all layers within tolerance" if all_ok else "SOME LAYERS ARE OFF THE REFERENCE")
    return 0 if all_ok else 1
