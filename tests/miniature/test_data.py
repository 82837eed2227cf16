import numpy as np
import torch

from imptome.miniature import data


def test_training_pairs_deterministic():
    p1, im1, o1 = data.training_pairs(16, seed=3)
    p2, im2, o2 = data.training_pairs(16, seed=3)
    p3, im3, _ = data.training_pairs(16, seed=4)
    assert p1 == p2 and o1 == o2
    np.testing.assert_array_equal(im1, im2)
    assert not np.array_equal(im1, im3)
    assert im1.shape == (16, data.IMAGE_SIZE, data.IMAGE_SIZE, 3) and im1.dtype == np.uint8


def test_held_out_never_sampled():
    held = set(data.held_out_triples())
    assert len(held) == 18
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(5000):
        for o in data.sample_objects(rng):
            seen.add((o.colour, o.shape, o.pos))
    assert not (seen & held)
    # every other triple does occur, so held-out prompts test composition, not unseen words
    assert len(seen) == len(data.COLOURS) * len(data.SHAPES) * data.N_POS - len(held)
    _, _, objs = data.training_pairs(500, seed=0)
    assert not any(data.is_held_out(o) for os in objs for o in os)


def test_held_out_prompts_contain_held_out_triples():
    lists = data.held_out_prompts()
    assert len(lists) == 36
    assert all(any(data.is_held_out(o) for o in os) for os in lists)
    assert all(len({o.pos for o in os}) == len(os) for os in lists)


def test_prompt_roundtrip_and_position_first():
    objs = [data.Obj(0, 1, 0), data.Obj(2, 3, 8)]
    p = data.prompt_for(objs)
    assert p == "top left: red square and bottom right: blue cross"
    assert data.parse_prompt(p) == objs


def test_objects_drawn_where_prompted():
    rng = np.random.default_rng(1)
    objs = [data.Obj(0, 0, 4)]
    img = data.render(objs, rng)
    m = data.object_mask(objs) > 0.99
    red = np.asarray(data.COLOURS["red"]) / 255
    assert np.abs(img[m] - red).max() < 0.15
    assert m[32, 32] and not m[5, 5]


def test_prompts_outside_the_grammar_are_found():
    inside = ["top left: red circle", "middle center: blue cross and bottom right: green square"]
    outside = ["a photo of a cat", "center: blue cross", "top left: purple circle", "top left: red"]
    assert data.outside_grammar(inside + outside) == outside


def test_the_warning_names_three_prompts_outside_the_grammar_and_counts_them_all():
    outside = ["a cat", "a dog", "a fox", "an owl"]
    warning = data.outside_grammar_warning(["top left: red circle", *outside])
    assert "4 of 5 prompt(s)" in warning and "'a cat', 'a dog', 'a fox' and 1 more." in warning
    assert "owl" not in warning
    three = data.outside_grammar_warning(outside[:3])
    assert "'a cat', 'a dog', 'a fox'. It reads" in three and "more" not in three
    assert data.outside_grammar_warning(["top left: red circle"]) is None


def test_prompts_are_read_in_any_case_and_spacing_as_the_tokenizer_reads_them():
    """The bundled model's tokenizer lowercases and collapses spaces, so these are the same prompt to it."""
    from imptome.miniature.build import tokenize
    from imptome.miniature.evaluate import load_miniature_pipeline

    variants = ["top left: red circle", "Top Left: Red Circle", "  TOP  left:red   circle "]
    tokenizer = load_miniature_pipeline().tokenizer
    ids = [tokenize(tokenizer, [prompt]) for prompt in variants]
    assert all(torch.equal(ids[0], other) for other in ids[1:])
    assert [data.parse_prompt(prompt) for prompt in variants] == [[data.Obj(0, 0, 0)]] * 3
    assert data.outside_grammar(variants) == []
