import numpy as np
import pytest

from imptome.miniature import classifier, data


def test_classifier_reads_procedural_images():
    rng = np.random.default_rng(123)
    objs = [data.sample_objects(rng, allow_held_out=True) for _ in range(96)]
    imgs = np.stack([data.render(o, rng) for o in objs])
    pred = classifier.classify(imgs)
    assert pred.shape == (96, data.N_POS)
    truth = np.full((96, data.N_POS), classifier.EMPTY)
    for i, os in enumerate(objs):
        for o in os:
            truth[i, o.pos] = o.cls
    assert (pred.numpy() == truth).mean() > 0.97
    s = classifier.score(imgs, [data.prompt_for(o) for o in objs])
    assert s["colour_shape_acc"] > 0.9 and s["position_acc"] > 0.9
    assert classifier.features(imgs[:4]).shape[0] == 4


def test_continued_training_saves_the_size_of_the_classifier_it_continued(tmp_path):
    """A classifier of another size, continued with `init`, is saved with its own config and loads again."""
    import json

    from safetensors.torch import save_file

    small = classifier.AttributeClassifier(width=8, feat_dim=16)
    (tmp_path / "small").mkdir()
    save_file(small.state_dict(), tmp_path / "small" / "model.safetensors")
    (tmp_path / "small" / "config.json").write_text(json.dumps({"width": 8, "feat_dim": 16}))
    info = classifier.train(steps=1, batch=4, out=tmp_path / "continued", init=tmp_path / "small")
    assert (info["width"], info["feat_dim"]) == (8, 16)
    loaded = classifier.load_classifier(tmp_path / "continued")
    assert loaded.fc[1].out_features == 16 and loaded.body[0][0].out_channels == 4


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--batch", "0"], "--batch must be 1 or more, not 0"),
        (["--steps", "-1"], "--steps must be 1 or more, not -1"),
        (["--threads", "0"], "--threads must be 1 or more, not 0"),
        (["--seed", "-1"], "--seed must be 0 or more, not -1"),
        (["--lr", "0"], "--lr must be more than 0, not 0.0"),
        (["--init", "{tmp}/none"], "holds no classifier (no model.safetensors)"),
        (["--vae", "{tmp}/none"], "no such pipeline folder or safetensors file"),
    ],
)
def test_bad_training_arguments_are_usage_errors_and_write_nothing(tmp_path, capsys, bad, message):
    """A bad value used to train anyway (--batch 0: NaN weights, --steps -1: untrained ones) or end in a
    stack trace; --out defaults to the shipped classifier, so nothing may be written."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        classifier.main(["--out", str(out), "--steps", "1", *[arg.format(tmp=tmp_path) for arg in bad]])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
