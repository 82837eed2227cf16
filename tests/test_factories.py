"""The tiny pipelines build offline, generate finite output and are deterministic."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from tests.factories import (
    tiny_animatediff_pipeline,
    tiny_clip_tokenizer,
    tiny_dit_pipeline,
    tiny_pixart_pipeline,
    tiny_pixart_sigma_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    tiny_svd_pipeline,
    tiny_t5,
)

PROMPT = "a photo of a red cat on the grass"


def _generate(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    """Two-step generation -> numpy array (images [B, H, W, 3], frames [B, F, H, W, 3] or latents)."""
    generator = torch.Generator().manual_seed(seed)
    if hasattr(pipe, "get_label_ids"):  # DiT: class-conditional, always decodes
        out = pipe(
            class_labels=pipe.get_label_ids(["cat"]),
            num_inference_steps=2,
            generator=generator,
            output_type="np",
            **kwargs,
        )
    elif hasattr(pipe, "image_encoder") and not hasattr(pipe, "tokenizer"):  # SVD: image-to-video
        image = Image.new("RGB", (128, 128), (200, 30, 30))
        out = pipe(image, height=128, width=128, num_inference_steps=2, generator=generator, **kwargs)
    else:
        out = pipe(PROMPT, num_inference_steps=2, generator=generator, **{"output_type": "np", **kwargs})
    result = out.frames if hasattr(out, "frames") else out.images
    return result.numpy() if isinstance(result, torch.Tensor) else np.asarray(result)


CASES: dict[str, tuple[Callable, dict, tuple[int, ...]]] = {
    "sd": (tiny_sd_pipeline, {}, (1, 128, 128, 3)),
    "sdxl": (tiny_sdxl_pipeline, {}, (1, 128, 128, 3)),
    "sdxl-no-top-attn": (lambda: tiny_sdxl_pipeline(top_level_attention=False), {}, (1, 128, 128, 3)),
    "pixart": (
        tiny_pixart_pipeline,
        {"use_resolution_binning": False, "clean_caption": False},
        (1, 128, 128, 3),
    ),
    "pixart-sigma": (
        tiny_pixart_sigma_pipeline,
        {"use_resolution_binning": False, "clean_caption": False},
        (1, 128, 128, 3),
    ),
    "dit": (tiny_dit_pipeline, {}, (1, 128, 128, 3)),
    "sd3": (tiny_sd3_pipeline, {"max_sequence_length": 32}, (1, 128, 128, 3)),
    "animatediff": (tiny_animatediff_pipeline, {"num_frames": 4}, (1, 4, 128, 128, 3)),
    "svd": (tiny_svd_pipeline, {"num_frames": 3, "output_type": "np"}, (1, 3, 128, 128, 3)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, kwargs, shape = CASES[request.param]
    return request.param, build(), kwargs, shape


def test_builds_in_eval_mode_on_cpu_fp32(case):
    _, pipe, _, _ = case
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    assert modules
    for module in modules:
        assert not any(m.training for m in module.modules()), type(module).__name__
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in module.parameters())


def test_generates_finite_and_deterministic(case):
    name, pipe, kwargs, shape = case
    first = _generate(pipe, **kwargs)
    assert first.shape == shape, name
    assert np.isfinite(first).all()
    assert first.std() > 0
    np.testing.assert_array_equal(first, _generate(pipe, **kwargs))
    assert not np.array_equal(first, _generate(pipe, seed=1, **kwargs))


def test_same_seed_same_weights_different_seed_different():
    a, b, c = tiny_sd_pipeline(), tiny_sd_pipeline(), tiny_sd_pipeline(seed=1)
    for name, p in a.unet.state_dict().items():
        assert torch.equal(p, b.unet.state_dict()[name]), name
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_builder_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    tiny_dit_pipeline()
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize(("height", "width"), [(144, 96), (96, 144), (72, 104)])
def test_sd_non_square_latents(height: int, width: int):
    """3x2 tiles of 6x6-latent views (and odd latent sides, 9 x 13) run through the 2-level UNet."""
    pipe = tiny_sd_pipeline()
    latents = _generate(pipe, height=height, width=width, output_type="latent")
    assert latents.shape == (1, 4, height // 8, width // 8)
    assert np.isfinite(latents).all()


def test_clip_tokenizer_pads_to_max_length():
    tok = tiny_clip_tokenizer()
    ids = tok(
        [PROMPT, "zebra!"],
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    assert ids.input_ids.shape == (2, 77)
    tokens = tok.convert_ids_to_tokens(ids.input_ids[0, :4].tolist())
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>"]
    assert ids.input_ids[0, -1].item() == tok.pad_token_id == tok.eos_token_id
    assert ids.attention_mask[0].sum().item() == 1 + len(PROMPT.split()) + 1


def test_t5_tokenizer_pads_with_mask():
    tok, encoder = tiny_t5()
    ids = tok([PROMPT, "zebra"], padding="max_length", max_length=120, truncation=True, return_tensors="pt")
    assert ids.input_ids.shape == (2, 120)
    assert ids.attention_mask[0].sum().item() == len(PROMPT.split()) + 1  # + </s>
    assert ids.input_ids[1, :2].tolist() == [tok.unk_token_id, tok.eos_token_id]
    with torch.no_grad():
        hidden = encoder(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    assert hidden.shape == (2, 120, 32)


def test_animatediff_motion_modules_are_active():
    """The motion modules are not zero-initialised: removing them would change the output."""
    pipe = tiny_animatediff_pipeline()
    proj = pipe.unet.down_blocks[0].motion_modules[0].proj_out
    assert proj.weight.abs().sum() > 0
