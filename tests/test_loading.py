"""Loading: device and model checks with clear errors, and the model fingerprints that result caches use to
tell a retrained model from the old one."""

import os

import pytest
import torch

from imptome import loading
from imptome.cli import CliError, check_model
from tests.factories import tiny_sdxl_pipeline


def _folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "weights.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "model_index.json").write_text("{}")
    return tmp_path


def test_fingerprint_follows_file_contents(tmp_path):
    folder = _folder(tmp_path)
    before = loading.model_fingerprint(str(folder))
    assert before.startswith("sha256:") and loading.model_fingerprint(str(folder)) == before
    (folder / "unet" / "weights.safetensors").write_bytes(b"\x01" + b"\x00" * 63)
    assert loading.model_fingerprint(str(folder)) != before


def test_large_files_are_identified_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_HASHED_BYTES", 16)  # every weight file counts as large here
    folder = _folder(tmp_path)
    weights = folder / "unet" / "weights.safetensors"
    os.utime(weights, ns=(1, 1))
    before = loading.model_fingerprint(str(folder))
    weights.write_bytes(b"\x01" + b"\x00" * 63)  # same size: only the modification time tells
    os.utime(weights, ns=(1, 1))
    assert loading.model_fingerprint(str(folder)) == before
    os.utime(weights, ns=(2, 2))
    assert loading.model_fingerprint(str(folder)) != before


def test_hub_ids_are_their_own_fingerprint():
    assert loading.model_fingerprint("some-org/some-model") == "some-org/some-model"


def test_devices_are_checked_before_any_work():
    assert loading.check_device("cpu") == "cpu"
    assert loading.check_device(None) == loading.default_device()
    with pytest.raises(CliError, match="not a device name"):
        loading.check_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(CliError, match="no cuda device is available here"):
            loading.check_device("cuda")
    else:
        count = torch.cuda.device_count()
        with pytest.raises(CliError, match=f"there are {count} cuda devices"):
            loading.check_device(f"cuda:{count}")


def test_a_pipeline_that_cannot_load_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
    )
    with pytest.raises(CliError, match=f"cannot load {tmp_path}: .*config.json"):
        loading.load_pipeline(str(tmp_path), "cpu")


def test_a_pipeline_imptome_cannot_patch_is_refused_at_loading(tmp_path):
    """DDPM's UNet2DModel has no attention over text and image tokens that imptome merges: every command
    would fail on it later, deep inside the pipeline."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    message = f"cannot use {tmp_path}: imptome cannot patch the UNet2DModel of this DDPMPipeline"
    with pytest.raises(CliError, match=message):
        loading.load_pipeline(str(tmp_path), "cpu")


def test_a_single_file_checkpoint_is_named_as_a_file(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(CliError, match="model.safetensors is a file; give a diffusers pipeline folder"):
        check_model(str(checkpoint))


def test_a_name_that_is_no_folder_nor_an_owner_name_hub_id_is_a_missing_folder(tmp_path):
    assert check_model("some-org/some-model") == "some-org/some-model"
    with pytest.raises(CliError, match="model folder sd15 does not exist .*owner/name"):
        check_model("sd15")  # a mistyped local folder, not a hub lookup that needs internet


def test_a_missing_folder_inside_a_local_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """`runs/model` before it is made: owner/name in form, but `runs` is here (once 33 s of hub retries)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(CliError, match="model folder runs/model does not exist in the local folder runs"):
        check_model("runs/model")
    assert check_model("stabilityai/sd-turbo") == "stabilityai/sd-turbo"  # no local folder stabilityai


def test_only_pipelines_with_a_safety_checker_are_told_not_to_load_one(tmp_path, monkeypatch):
    """diffusers warns about a safety_checker=None given to a pipeline without that component (SDXL)."""
    tiny_sdxl_pipeline().save_pretrained(tmp_path / "sdxl")
    calls = []
    load = loading.DiffusionPipeline.from_pretrained

    def recording(source, **kwargs):
        calls.append(kwargs)
        return load(source, **kwargs)

    monkeypatch.setattr(loading.DiffusionPipeline, "from_pretrained", recording)
    assert type(loading.load_pipeline(str(tmp_path / "sdxl"), "cpu")).__name__ == "StableDiffusionXLPipeline"
    assert loading.load_pipeline(None, "cpu").components["safety_checker"] is None  # the bundled SD model
    assert ["safety_checker" in kwargs for kwargs in calls] == [False, True]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_pipeline_loads_in_the_dtype_asked_for(dtype):
    """On every diffusers imptome allows: 0.35-0.39 ignore from_pretrained's `dtype` (newer ones deprecate
    `torch_dtype`), which once loaded float32 whatever --dtype said."""
    pipe = loading.load_pipeline(None, "cpu", dtype)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {getattr(torch, dtype)}
