"""tools/train_demo_model.py: its data and, on a few steps, its colour-separation stages (5-7) end to end.

The full training is an hour on 2 cores (docs/demo-model.md); here every stage runs a few steps from the
shipped model (`--init-from`), which is what the shipped model's last stages were run from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import train_demo_model as demo  # tools/ is on sys.path (pytest's pythonpath, pyproject.toml)

from sdcore.models import demo_model_path


@pytest.fixture
def keep_torch_threads():
    """main() sets torch's thread count (--threads, 1); the rest of the test session keeps its own."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_colour_partners_are_the_same_drawing_in_another_colour():
    images, partners, labels = demo.colour_partner_batch(np.random.Generator(np.random.PCG64(3)), 12)
    assert images.shape == partners.shape == (12, demo.SIZE, demo.SIZE, 3)
    for image, partner, label in zip(images, partners, labels):
        bg = np.array(demo.BACKGROUNDS[label["background"]])
        shape = np.abs(image.astype(int) - bg).sum(-1) > 0  # [64, 64]
        shape_partner = np.abs(partner.astype(int) - bg).sum(-1) > 0
        assert (shape == shape_partner).all(), "the partner is drawn at another place or size"
        assert demo.describe(image)["colour"] == label["colour"]
        assert demo.describe(partner)["colour"] != label["colour"]
        assert demo.describe(partner)["position"] == demo.describe(image)["position"]


@pytest.mark.skipif(not (demo_model_path() / "sdcore.json").exists(), reason="the demo model is not shipped")
def test_separation_stages_run_and_export(tmp_path, keep_torch_threads):
    pytest.importorskip("diffusers")
    import torch

    work = tmp_path / "work"
    args = ["--init-from", str(demo_model_path()), "--separation-steps", "3", "--finetune-steps", "3",
            "--pool-size", "64", "--unet-batch", "4", "--vae-batch", "2", "--checkpoint-every", "2"]
    assert demo.main([str(work), *args]) == 0
    log = (work / "train.log").read_text()
    assert "separation step 2" in log and "finetune step 2" in log
    shipped = json.loads((demo_model_path() / "vae" / "config.json").read_text())
    exported = json.loads((work / "diffusers" / "vae" / "config.json").read_text())
    assert exported["scaling_factor"] == pytest.approx(shipped["scaling_factor"]), "stage 6 must keep the scale"
    # The separation hinge moves the encoder: the exported VAE is not the shipped one.
    from safetensors.numpy import load_file

    ours = load_file(work / "diffusers" / "vae" / "diffusion_pytorch_model.safetensors")
    theirs = load_file(demo_model_path() / "vae" / "diffusion_pytorch_model.safetensors")
    assert set(ours) == set(theirs)
    assert any(not np.array_equal(ours[k], theirs[k]) for k in ours if k.startswith("encoder."))
    # Resuming a finished run does not train again: the checkpoints hold the last step.
    assert torch.load(work / "checkpoints" / "finetune.pt", weights_only=False)["step"] == 3
    assert demo.main([str(work), *args]) == 0
    log = (work / "train.log").read_text()
    assert log.count("finetune step 2") == 1 and "separation: resumed at step 3" in log


def test_init_from_a_folder_without_a_model_is_one_line(tmp_path, keep_torch_threads):
    with pytest.raises(SystemExit, match="not a diffusers or sdcore model folder"):
        demo.main([str(tmp_path / "work"), "--init-from", str(tmp_path)])


def test_evaluate_without_an_export_is_one_line(tmp_path, keep_torch_threads):
    with pytest.raises(SystemExit, match="not a diffusers or sdcore model folder"):
        demo.main([str(tmp_path / "work"), "--evaluate"])


def test_whole_run_for_a_few_steps(tmp_path, keep_torch_threads):
    """Stages 1-7 and the export, a few steps each."""
    pytest.importorskip("diffusers")
    import torch

    work = tmp_path / "work"
    assert demo.main([str(work), "--vae-steps", "2", "--decoder-steps", "2", "--unet-steps", "2",
                      "--separation-steps", "2", "--finetune-steps", "2", "--pool-size", "64",
                      "--unet-batch", "2", "--vae-batch", "2"]) == 0
    log = (work / "train.log").read_text()
    assert "unet step 1" in log and "separation step 1" in log and "finetune step 1" in log
    assert torch.load(work / "checkpoints" / "unet.pt", weights_only=False)["step"] == 2
    assert (work / "diffusers" / "model_index.json").exists()
