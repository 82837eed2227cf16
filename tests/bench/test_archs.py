"""Real-size benchmark architectures: parameter counts, input shapes (checked by meta-device forwards)."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from imptome.bench import denoisers
from imptome.bench.archs import ARCHS
from imptome.bench.denoisers import build_denoiser, example_inputs

CASES = [(name, res) for name, spec in ARCHS.items() for res in spec.resolutions]


# Parameters of each released denoiser.
PUBLISHED_PARAMS = {
    "sd15": 859_520_964,  # exact count of the released SD 1.5 UNet
    "sd2": 865_910_724,  # exact count of the released SD 2.x UNet
    "sdxl": 2_567_463_684,  # exact count of the released SDXL base UNet
    "pixart-alpha": 611_000_000,  # 0.6B in the PixArt-alpha paper; ~2.45 GB fp32 transformer checkpoint
    "animatediff": 859_520_964 + 453_000_000,  # SD 1.5 UNet + ~453M motion modules (mm_sd_v15_v2: ~1.82 GB)
    "svd": 1_524_623_082,  # diffusers' UNetSpatioTemporalConditionModel with its default config, for SVD
    "sd3": 2_028_328_000,  # exact count of the released SD3 Medium transformer config ("2B")
}
EXACT = ("sd15", "sd2", "sdxl", "sd3")


def count_params(name: str) -> int:
    """Parameters of the `name` denoiser, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = denoisers._construct(ARCHS[name])
    return sum(p.numel() for p in model.parameters())


def test_every_architecture_has_a_published_count():
    assert set(PUBLISHED_PARAMS) == set(ARCHS)


@pytest.mark.parametrize("name", list(ARCHS))
def test_param_count_matches_published(name: str):
    published = PUBLISHED_PARAMS[name]
    if name in EXACT:
        assert count_params(name) == published
    else:
        assert count_params(name) == pytest.approx(published, rel=5e-3)


def test_architecture_details():
    with torch.device("meta"):
        sd2 = UNet2DConditionModel(**ARCHS["sd2"].config)
        sdxl = UNet2DConditionModel(**ARCHS["sdxl"].config)
    top = sd2.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert (top.heads, top.inner_dim // top.heads) == (5, 64)
    assert sd2.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.in_features == 1024
    assert not hasattr(sdxl.down_blocks[0], "attentions")  # SDXL: no attention at full resolution
    assert len(sdxl.down_blocks[2].attentions[0].transformer_blocks) == 10
    assert ARCHS["sd2"].top_level_tokens(768) == 9216  # a 96 x 96 latent
    assert ARCHS["sdxl"].top_level_tokens(1024) == 4096
    assert ARCHS["pixart-alpha"].top_level_tokens(1024) == 4096
    assert ARCHS["animatediff"].top_level_tokens(512) == 4096
    assert ARCHS["svd"].top_level_tokens(768) == 9216 == 72 * 128  # SVD's 576 x 1024 px per frame
    assert ARCHS["sd3"].top_level_tokens(1024) == 4096


@pytest.mark.parametrize(("name", "res"), CASES)
def test_example_inputs_fit_the_model(name: str, res: int):
    """A meta-device forward checks every shape at full size without computing anything."""
    spec = ARCHS[name]
    kwargs = example_inputs(name, res, batch=1, device="meta")
    h = w = res // 8
    first = kwargs["hidden_states"] if spec.model_kind in ("pixart", "sd3") else kwargs["sample"]
    frames = spec.num_frames
    if spec.model_kind == "svd":  # frames before channels; 4 channels of image latents after the noisy ones
        assert first.shape == (2, frames, 8, h, w)
    else:
        channels = spec.latent_channels
        assert first.shape == ((2, channels, frames, h, w) if frames else (2, channels, h, w))
    text_batch = 2 * frames if spec.model_kind == "animatediff" else 2
    assert kwargs["encoder_hidden_states"].shape == (text_batch, spec.text_seq_len, spec.text_embed_dim)
    if spec.model_kind == "sdxl":
        assert kwargs["added_cond_kwargs"]["text_embeds"].shape == (2, 1280)
        assert kwargs["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    with torch.device("meta"):
        model = denoisers._construct(spec).to("meta")  # SVD makes a buffer on the CPU whatever the context
    with torch.no_grad():
        out = model(**kwargs)[0]
    if spec.model_kind == "svd":
        assert out.shape == (2, frames, 4, h, w)
    else:
        out_channels = {"pixart": 8, "sd3": 16}.get(spec.model_kind, 4)
        assert out.shape == first.shape[:1] + (out_channels,) + first.shape[2:]


def test_example_inputs_options():
    kwargs = example_inputs("sdxl", (768, 1344), batch=3, cfg=False)
    assert kwargs["sample"].shape == (3, 4, 96, 168)
    assert kwargs["added_cond_kwargs"]["time_ids"][0].tolist() == [768, 1344, 0, 0, 768, 1344]
    pixart = example_inputs("pixart-alpha", 512, dtype=torch.bfloat16)
    assert pixart["hidden_states"].dtype == torch.bfloat16
    assert pixart["timestep"].shape == (2,)
    assert pixart["added_cond_kwargs"]["resolution"].tolist() == [[512, 512]] * 2
    video = example_inputs("animatediff", 256, num_frames=8)
    assert video["sample"].shape == (2, 4, 8, 32, 32)
    text = video["encoder_hidden_states"]
    assert torch.equal(text[0], text[7]) and not torch.equal(text[7], text[8])  # per-frame copies
    svd = example_inputs("svd", 64, num_frames=3)
    uncond, cond = svd["sample"].chunk(2)  # [1, 3, 8, 8, 8] each
    assert torch.equal(uncond[:, :, :4], cond[:, :, :4])  # the same noisy latents in both CFG halves
    assert not uncond[:, :, 4:].any() and cond[:, :, 4:].any()  # image latents: zeros when unconditional
    assert torch.equal(cond[:, 0, 4:], cond[:, 2, 4:])  # one conditioning image for every frame
    assert not svd["encoder_hidden_states"][0].any() and svd["added_time_ids"].shape == (2, 3)
    assert torch.equal(example_inputs("sd15", 64)["sample"], example_inputs("sd15", 64)["sample"])
    with pytest.raises(ValueError):
        example_inputs("sd2", 500)
    with pytest.raises(KeyError):
        example_inputs("flux", 512)


def test_materialize_is_deterministic_and_finite():
    def build(seed: int) -> torch.nn.Module:
        with init_empty_weights(include_buffers=False):
            layers = [torch.nn.Conv2d(4, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 8)]
            model = torch.nn.Sequential(*layers)
        denoisers._materialize(model, torch.bfloat16, torch.device("cpu"), seed)
        return model

    a, b, c = build(0), build(0), build(1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert pa.dtype == torch.bfloat16 and torch.isfinite(pa).all()
        assert torch.equal(pa, pb)
        if pa.ndim > 1:
            assert not torch.equal(pa, pc)
            assert pa.abs().max() <= 1 / pa[0].numel() ** 0.5
        else:
            assert torch.all(pa == (0 if name.endswith("bias") else 1))


@pytest.mark.slow
def test_sd15_real_forward_is_finite():
    """One real forward of the 860M-parameter SD 1.5 UNet at 64 px (latent 8x8): ~3.5 GB, ~10 s on CPU."""
    model = build_denoiser("sd15")
    assert not any(p.is_meta or p.requires_grad for p in model.parameters())
    assert not model.training
    with torch.inference_mode():
        out = model(**example_inputs("sd15", 64))[0]
    assert out.shape == (2, 4, 8, 8)
    assert torch.isfinite(out).all()
    assert 0 < out.std() < 100
