"""The training script end to end at toy size: stages, resuming from checkpoints, determinism, export."""

import json

import pytest
import torch
from safetensors.torch import load_file

from imptome.miniature import train

TOY = [
    "--vae-steps", "2", "--vae-batch", "2", "--n-train", "8", "--batch", "2", "--warmup", "1",
    "--probe-every", "0", "--ckpt-every", "1", "--threads", "1",
]  # fmt: skip


def _unet_weights(out):
    return load_file(out / "ckpt_unet" / "weights.safetensors")


class _Interrupted(Exception):
    pass


def test_training_resumes_where_it_stopped_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = ["--unet-steps", "3", *TOY]
    train.main(["--out", str(whole), *args])

    step = torch.optim.AdamW.step
    calls = []

    def step_until_interrupted(self, *a, **k):  # 2 VAE steps, 2 UNet steps, then the process "dies"
        calls.append(1)
        if len(calls) == 5:
            raise _Interrupted
        return step(self, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", step_until_interrupted)
        with pytest.raises(_Interrupted):
            train.main(["--out", str(split), *args])
    train.main(["--out", str(split), *args])
    log = (split / "train_log.txt").read_text()
    assert "unet: resumed at step 2" in log
    assert json.loads((split / "ckpt_unet" / "state.json").read_text())["step"] == 3
    a, b = _unet_weights(whole), _unet_weights(split)
    assert a.keys() == b.keys()
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)  # seeded per step: resuming changes nothing
    timing = json.loads((split / "timing.json").read_text())
    assert {"vae_s", "latents_s", "unet_s"} <= timing.keys()


def test_loss_weighting_changes_training(tmp_path):
    plain, min_snr = tmp_path / "plain", tmp_path / "min_snr"
    train.main(["--out", str(plain), "--unet-steps", "1", *TOY])
    train.main(["--out", str(min_snr), "--unet-steps", "1", "--min-snr-gamma", "5", *TOY])
    a, b = _unet_weights(plain), _unet_weights(min_snr)
    assert any((a[k] - b[k]).abs().max() > 0 for k in a if k.startswith("unet."))


def test_export_only_writes_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    train.main(["--out", str(out), "--unet-steps", "1", *TOY])
    train.main(["--out", str(out), "--export-only", "--export", str(tmp_path / "pipe")])
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    weights = _unet_weights(out)
    for name, model in (("ema_unet", pipe.unet), ("ema_te", pipe.text_encoder)):  # the EMA weights, not the
        # trained ones (after one step with warm-up the two differ)
        ema = {k[len(name) + 1 :]: v for k, v in weights.items() if k.startswith(name + ".")}
        assert ema and all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
    trained = {k[len("unet.") :]: v for k, v in weights.items() if k.startswith("unet.")}
    assert any(not torch.equal(pipe.unet.state_dict()[k], v) for k, v in trained.items())
    latents = load_file(out / "latents.safetensors")["latents"]
    assert pipe.vae.config.scaling_factor == pytest.approx(1 / latents.std().item())  # unit-variance latents


def test_export_only_without_a_folder_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stopped:
        train.main(["--export-only"])
    assert stopped.value.code == 2
    assert "--export-only needs --export FOLDER" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--threads", "0"], "--threads must be 1 or more, not 0"),
        (["--ckpt-every", "0"], "--ckpt-every must be 1 or more, not 0"),
        (["--n-train", "0"], "--n-train must be 1 or more, not 0"),
        (["--batch", "0"], "--batch must be 1 or more, not 0"),
        (["--vae-batch", "0"], "--vae-batch must be 1 or more, not 0"),
        (["--seed", "-1"], "--seed must be 0 or more, not -1"),
        (["--unet-steps", "-5"], "--unet-steps must be 0 or more, not -5"),
        (["--lr", "nan"], "--lr must be more than 0, not nan"),
        (["--caption-dropout", "2"], "--caption-dropout must be between 0 and 1, not 2.0"),
        (["--ema", "-0.5"], "--ema must be between 0 and 1, not -0.5"),
        (["--vae-crop", "0"], "--vae-crop must be a multiple of 4 from 4 to 64"),
        (["--vae-crop", "30"], "--vae-crop must be a multiple of 4 from 4 to 64"),
        (["--vae-crop", "100"], "--vae-crop must be a multiple of 4 from 4 to 64"),
    ],
)
def test_bad_values_are_usage_errors_before_any_training(tmp_path, capsys, bad, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train.main(["--out", str(out), "--unet-steps", "1", *TOY, *bad])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_export_only_from_a_folder_without_a_run_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.main(["--out", str(tmp_path / "none"), "--export-only", "--export", str(tmp_path / "pipe")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "holds no trained run to export (missing vae_final.safetensors" in err
    assert not (tmp_path / "pipe").exists()


def test_a_rerun_with_other_settings_is_refused_not_mixed_into_the_run(tmp_path, capsys):
    """Resuming reuses the VAE, latents and UNet checkpoint; with another seed the folder's args.json would
    claim seed 1 for weights trained with seed 0. Thread and probe settings may change."""
    out = tmp_path / "run"
    train.main(["--out", str(out), "--unet-steps", "1", *TOY])
    recorded = (out / "args.json").read_text()
    with pytest.raises(SystemExit) as stopped:
        train.main(["--out", str(out), "--unet-steps", "1", *TOY, "--seed", "1"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"{out} holds a run trained with --seed 0; resume it with the same values" in err
    assert (out / "args.json").read_text() == recorded
    train.main(["--out", str(out), "--unet-steps", "1", *TOY, "--threads", "2", "--probe-every", "1"])
