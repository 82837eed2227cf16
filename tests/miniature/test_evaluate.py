"""The model card's figures: the CFG importance recorder and the inside/outside importance ratio."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imptome.miniature import data, evaluate


def test_importance_ratio_compares_the_objects_masks_with_the_background():
    """A map of 3 on the objects (pooled mask > 0.5), 1 on the background (< 0.05) and 2 on their edges has
    ratio 3 whatever the layout; images without objects are left out."""
    obj_lists = [[data.Obj(0, 0, 0)], [data.Obj(1, 1, 4), data.Obj(2, 3, 8)], []]
    masks = torch.from_numpy(np.stack([data.object_mask(objs) for objs in obj_lists]))[:, None]
    pooled = F.adaptive_avg_pool2d(masks, (16, 16))[:, 0]
    maps = torch.full_like(pooled, 2.0)
    maps[pooled > 0.5], maps[pooled < 0.05] = 3.0, 1.0
    maps[2] = 100.0  # the image without objects: left out
    result = evaluate.importance_ratio(maps, obj_lists)
    expected = {"inside": 3.0, "outside": 1.0, "ratio": 3.0, "median_per_image_ratio": 3.0}
    assert result == pytest.approx(expected)


def test_the_recorder_averages_the_cfg_difference_over_calls():
    """A forward hook on a [uncond, cond] batch: the channel mean of |cond - uncond| averaged over calls."""
    outputs = [torch.randn(4, 3, 2, 2) for _ in range(2)]
    model = torch.nn.Identity()
    recorder = evaluate.ImportanceRecorder(model)
    for output in outputs:
        model((output,))  # tuple output, as a UNet called with return_dict=False
    recorder.remove()
    model((torch.zeros(4, 3, 2, 2),))  # removed: not recorded
    expected = sum((out[2:] - out[:2]).abs().mean(1) for out in outputs) / 2
    torch.testing.assert_close(recorder.mean_map(), expected)


def test_the_card_describes_the_shipped_model():
    card = evaluate.describe_model()
    assert card["latent_grid"] * 4 == card["image_size"] == data.IMAGE_SIZE  # VAE downsampling 4
    assert card["unet_params"] > 0 and card["vocab_size"] > len(data.COLOUR_NAMES) + len(data.SHAPES)
    assert len(card["held_out_triples"]) == 18


def _pickled_pipeline(folder):
    """The shipped pipeline saved again with pickled (.bin) UNet and VAE weights (transformers writes the text
    encoder as safetensors whatever it is asked)."""
    evaluate.load_miniature_pipeline().save_pretrained(folder, safe_serialization=False)
    for part in ("unet", "vae"):
        assert [f.name for f in (folder / part).glob("*.*") if f.suffix != ".json"] == [
            "diffusion_pytorch_model.bin"
        ]
    return folder


def test_pickled_weights_are_refused_not_unpickled(tmp_path):
    from imptome.miniature import classifier

    folder = _pickled_pipeline(tmp_path / "pickled")
    with pytest.raises(OSError, match="safetensors"):
        evaluate.load_miniature_pipeline(folder)
    with pytest.raises(OSError, match="safetensors"):
        classifier.load_vae(folder)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--seeds", "0"], "--seeds must be 1 or more, not 0"),
        (["--steps", "0"], "--steps must be 1 or more, not 0"),
        (["--threads", "0"], "--threads must be 1 or more, not 0"),
        (["--guidance", "5", "0.5"], "--guidance takes CFG scales above 1"),
        (["--model", "{tmp}/no_such_model"], "no_such_model is not a pipeline folder"),
        (["--run-dir", "{tmp}/no_such_run"], "no_such_run is not a folder"),
        (["--out", "{tmp}/no_such_folder/card.json"], "no folder"),
        (["--out", "{tmp}/broken.json"], "broken.json is not a readable JSON model card"),
    ],
)
def test_bad_arguments_are_usage_errors_before_the_evaluation(tmp_path, monkeypatch, capsys, bad, message):
    (tmp_path / "broken.json").write_text("{not json")
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"training": {"kept": True}}))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the evaluation ran")

    monkeypatch.setattr(evaluate, "evaluate", must_not_run)
    monkeypatch.setattr(evaluate, "describe_model", lambda path=None: {})
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["--out", str(card), *[arg.format(tmp=tmp_path) for arg in bad]])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert json.loads(card.read_text()) == {"training": {"kept": True}}  # untouched
