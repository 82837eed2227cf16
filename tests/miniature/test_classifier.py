import numpy as np

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
