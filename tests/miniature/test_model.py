import numpy as np
import torch

from imptome.miniature import MODEL_DIR, build, miniature_path


def test_build_and_reload_random_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from imptome.miniature.train import export

    torch.manual_seed(0)
    tok = build.build_tokenizer()
    export(tmp_path, build.build_vae(), build.build_text_encoder(len(tok)), build.build_unet(), 1.0)
    assert not list(tmp_path.rglob("*.bin"))
    assert _text_encoder_names(tmp_path) and all(
        name.startswith("text_model.") for name in _text_encoder_names(tmp_path)
    )
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    out = pipe("top left: red circle", num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_shipped_model_generates_offline():
    from diffusers import StableDiffusionPipeline

    size = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 30 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(miniature_path(), local_files_only=True)
    assert pipe.safety_checker is None
    g = torch.Generator().manual_seed(0)
    prompts = ["top left: red circle", "bottom right: blue square"]
    out = pipe(prompts, num_inference_steps=2, generator=g, output_type="np").images
    assert out.shape == (2, 64, 64, 3) and np.isfinite(out).all()


def _text_encoder_names(folder) -> list[str]:
    from safetensors import safe_open

    with safe_open(folder / "text_encoder" / "model.safetensors", "pt") as weights:
        return list(weights.keys())


def test_the_shipped_model_loads_every_weight_by_name():
    """Saved by transformers 5.24, the text encoder's weight names lacked the `text_model.` prefix, and
    transformers 5.0-5.5 (5.0 is the floor) matched none of them: the bundled model ran with a random text
    encoder, drawing shapes anywhere, with a log line only. Every name carries the prefix, which every 5.x
    loads; CI's oldest-versions run loads the model with transformers 5.0 and diffusers 0.35.2."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert all(name.startswith("text_model.") for name in _text_encoder_names(MODEL_DIR))
    _, info = CLIPTextModel.from_pretrained(MODEL_DIR / "text_encoder", output_loading_info=True)
    infos = {"text_encoder": info}
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):  # the same check, by diffusers
        _, infos[name] = cls.from_pretrained(MODEL_DIR, subfolder=name, output_loading_info=True)
    for name, info in infos.items():
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), name
