"""Turn what users have into one sdcore model directory (docs/model-format.md).

Sources: a diffusers pipeline folder (safetensors or .bin weights), or a single-file original-format
SD1.x/SD2.x checkpoint (.safetensors, .ckpt; the kind is read from the contents, never the name).
Everything is checked before anything is written: the result is built in a temporary folder beside
the output and renamed into place, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

import sdcore
from sdcore import weights
from sdcore.errors import SdcoreError, UsageError
from sdcore.hashing import sha256_files

SUPPORTED_DTYPES = ("float32", "float16")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# The scheduler settings every SD1.x/SD2.x model was trained with (the CompVis/Stability configs).
DEFAULT_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
}

# diffusers folder: component -> candidate weight files, in order of preference.
_DIFFUSERS_FILES = {
    "unet": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"],
    "vae": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"],
    "text_encoder": ["model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin"],
}
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass
class Converted:
    """Everything that goes into a model directory, checked, before it is written."""

    components: dict[str, tuple[dict, dict[str, np.ndarray]]]  # name -> (config, state dict)
    scheduler_config: dict
    family: str
    inpainting: bool
    prediction_type: str
    source_kind: str
    model_hash: str
    tokenizer_dir: Path | None  # copy these files, or None: write the shipped vocabulary
    notes: list[str]


def convert(src: str | os.PathLike, output: str | os.PathLike, *, dtype: str = "float32",
            prediction_type: str | None = None, use_ema: bool | None = None, overwrite: bool = False,
            log=print) -> Path:
    """Convert `src` into the model directory `output`; returns its path. Prints what it decided."""
    src, output = Path(src), Path(output)
    if dtype not in SUPPORTED_DTYPES:
        raise UsageError(f"unsupported dtype {dtype!r}: choose one of {', '.join(SUPPORTED_DTYPES)}.")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UsageError(f"unknown prediction type {prediction_type!r}: choose one of "
                          f"{', '.join(PREDICTION_TYPES)}.")
    if not src.exists():
        raise SdcoreError(f"{src} does not exist.")
    if output.exists() and not overwrite:
        raise SdcoreError(f"{output} already exists: choose another --output or pass --overwrite.")
    if output.resolve() == src.resolve():
        raise SdcoreError("the output must not be the source.")

    if src.is_dir():
        converted = _from_diffusers(src, prediction_type)
    else:
        converted = _from_single_file(src, prediction_type, use_ema)

    for name, (config, state) in converted.components.items():  # checked by the readers below
        converted.components[name] = (config, {k: _cast(v, dtype) for k, v in state.items()})

    _write(converted, output, dtype, src, overwrite)
    for note in converted.notes:
        log(f"  {note}")
    log(f"wrote {output} ({converted.family}, {'inpainting, ' if converted.inpainting else ''}"
        f"{converted.prediction_type}, {dtype})")
    return output


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    return array.astype(dtype) if array.dtype.kind == "f" and array.dtype != np.dtype(dtype) else array


# ----------------------------------------------------------------------------------------------
# diffusers folders


def _from_diffusers(src: Path, prediction_type: str | None) -> Converted:
    from sdcore.convert.checkpoint import read_state_dict

    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer") if not (src / c).is_dir()]
    if missing:
        raise SdcoreError(f"{src} is a folder but not a diffusers Stable Diffusion pipeline: missing "
                          f"{', '.join(missing)}/.")
    notes = [f"source: diffusers folder {src}"]
    components = {}
    weight_files = []
    for name, candidates in _DIFFUSERS_FILES.items():
        config = _read_json(src / name / "config.json")
        found = [src / name / f for f in candidates if (src / name / f).exists()]
        if not found:
            if list((src / name).glob("*.index.json")):
                raise SdcoreError(f"{src / name} holds sharded weights, which sdcore does not read yet.")
            raise SdcoreError(f"{src / name} has no weights (looked for {', '.join(candidates)}).")
        weights.model_classes(name)[0].from_dict(config)  # one line for a class or option sdcore lacks
        config = _clean_config(config)
        state, _meta = read_state_dict(found[0])
        weight_files.append(found[0])
        state = weights.check_state_dict(name, weights.sdcore_names(name, state), weights.expected_shapes(name, config),
                                         source=str(found[0]))
        components[name] = (config, state)
        notes.append(f"{name}: {found[0].name} ({len(state)} tensors)")

    from sdcore.tokenizer import CLIPTokenizer

    CLIPTokenizer.from_dir(src / "tokenizer")  # vocab.json + merges.txt or tokenizer.json, validated here

    inpainting = weights.check_components({name: config for name, (config, _state) in components.items()})
    # SD2.x's OpenCLIP text tower is the one with plain gelu (SD1.x's OpenAI CLIP uses quick_gelu)
    text_config = components["text_encoder"][0]
    family = "sd2" if text_config.get("hidden_act") == "gelu" or text_config.get("hidden_size") == 1024 else "sd1"
    scheduler_path = src / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_path) if scheduler_path.exists() else dict(DEFAULT_SCHEDULER)
    if prediction_type is not None:
        decided = f"prediction type: {prediction_type} (from --prediction-type)"
    elif "prediction_type" in scheduler:
        prediction_type = scheduler["prediction_type"]
        decided = f"prediction type: {prediction_type} (from scheduler/scheduler_config.json)"
    else:
        prediction_type = "epsilon"
        decided = "prediction type: epsilon (the scheduler config names none; diffusers' default)"
    scheduler["prediction_type"] = prediction_type
    notes.append(decided)
    return Converted(components, scheduler, family, inpainting, prediction_type, "diffusers",
                     sha256_files(weight_files)[:10], src / "tokenizer", notes)


def _clean_config(config: dict) -> dict:
    """Drop diffusers' bookkeeping keys (`_class_name`, `_diffusers_version`, ...); keep the model's."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SdcoreError(f"{path} is missing.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SdcoreError(f"{path} is not valid JSON ({err}).") from None


# ----------------------------------------------------------------------------------------------
# single-file checkpoints


def _from_single_file(src: Path, prediction_type: str | None, use_ema: bool | None) -> Converted:
    from sdcore.convert.checkpoint import read_state_dict, sha256_10
    from sdcore.convert.original import split_original

    state, meta = read_state_dict(src)
    split = split_original(state, use_ema=use_ema)
    notes = [f"source: {meta.get('kind', 'checkpoint')} file {src}"] + list(split.notes)
    if split.ignored_keys:
        notes.append(f"ignored {len(split.ignored_keys)} tensors that are not weights of the networks "
                     f"(e.g. {split.ignored_keys[0]})")
    if prediction_type is not None:
        notes.append(f"prediction type: {prediction_type} (from --prediction-type)")
    elif split.family == "sd1":
        prediction_type = "epsilon"
        notes.append("prediction type: epsilon (every SD1.x model is)")
    else:
        # The weights cannot tell SD2.x-v (768) from SD2.x-base (512): default to v_prediction, as
        # diffusers' single-file loader does for SD2.x, and say how to change it.
        prediction_type = "v_prediction"
        notes.append("prediction type: v_prediction (SD2.x default; the weights cannot tell; for an SD2.x-base or "
                     "other epsilon model pass --prediction-type epsilon)")
    scheduler = dict(DEFAULT_SCHEDULER, prediction_type=prediction_type)
    components = {
        "text_encoder": (split.text_encoder_config, split.text_encoder),
        "unet": (split.unet_config, split.unet),
        "vae": (split.vae_config, split.vae),
    }
    return Converted(components, scheduler, split.family, split.inpainting, prediction_type,
                     meta.get("kind", "checkpoint"), sha256_10(src), None, notes)


# ----------------------------------------------------------------------------------------------
# writing


def _write(converted: Converted, output: Path, dtype: str, src: Path, overwrite: bool) -> None:
    from safetensors.numpy import save_file

    from sdcore.tokenizer import write_vocab_files

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    os.chmod(tmp, 0o755)
    try:
        for name, (config, state) in converted.components.items():
            (tmp / name).mkdir()
            (tmp / name / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
                      str(weights.weight_path(tmp, name)), metadata={"format": "pt"})
        (tmp / "tokenizer").mkdir()
        if converted.tokenizer_dir is not None:
            for f in _TOKENIZER_FILES:
                if (converted.tokenizer_dir / f).exists():
                    shutil.copyfile(converted.tokenizer_dir / f, tmp / "tokenizer" / f)
        else:
            write_vocab_files(tmp / "tokenizer", pad_token="!" if converted.family == "sd2" else "<|endoftext|>")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(converted.scheduler_config, indent=2, sort_keys=True) + "\n")
        pipeline = "StableDiffusionInpaintPipeline" if converted.inpainting else "StableDiffusionPipeline"
        model_index = {
            "_class_name": pipeline,
            "scheduler": ["diffusers", converted.scheduler_config.get("_class_name", "PNDMScheduler")],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        (tmp / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
        info = {
            "format": 1,
            "family": converted.family,
            "inpainting": converted.inpainting,
            "prediction_type": converted.prediction_type,
            "dtype": dtype,
            "source": {"path": str(src), "kind": converted.source_kind, "sha256_10": converted.model_hash},
            "sdcore_version": sdcore.__version__,
            "notes": converted.notes,
        }
        (tmp / "sdcore.json").write_text(json.dumps(info, indent=2) + "\n")
        if output.exists() and overwrite:
            old = output.with_name(f".{output.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
