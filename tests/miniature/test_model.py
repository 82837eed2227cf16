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
