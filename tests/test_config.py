"""MergeConfig: every bad value is refused when the config is made, with what is allowed."""

from __future__ import annotations

import pytest

from imptome import PRESETS, MergeConfig


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": 0.8}, "ratio=0.8 is out of range: allowed 0 <= ratio <= 0.75"),
        ({"ratio": float("nan")}, "ratio=nan is out of range"),
        ({"method": "random"}, "method='random' is not supported; choose one of importance, tome"),
        ({"fallback": "cells"}, "fallback='cells' is not supported; choose one of auto, random, tome"),
        ({"pool_factor": 0.9}, "pool_factor=0.9 must be a finite number >= 1"),
        ({"pool_factor": float("nan")}, "pool_factor=nan must be a finite number >= 1"),
        ({"pool_factor": float("inf")}, "pool_factor=inf must be a finite number >= 1"),
        ({"dst_fraction": 0.6}, "dst_fraction=0.6 must be in (0, 0.5]"),
        ({"sx": 2.0}, "sx=2.0 must be an int"),
        ({"similarity_chunk": 1e9}, "similarity_chunk=1000000000.0 must be an int"),
        ({"merge_start_step": True}, "merge_start_step=True must be an int"),
        ({"sx": 1, "sy": 1}, "cells must hold at least 2 tokens"),
        ({"max_downsample": 3}, "max_downsample=3 must be None (auto) or one of 1, 2, 4, 8"),
        ({"max_downsample": True}, "max_downsample=True must be None (auto) or one of 1, 2, 4, 8"),
        ({"max_downsample": 2.0}, "max_downsample=2.0 must be None (auto) or one of 1, 2, 4, 8"),
        ({"block_range": (5, 5)}, "block_range=(5, 5) must be (first, stop), 0 <= first < stop"),
        ({"block_range": (1, 2, 3)}, "block_range=(1, 2, 3) must be None or a pair of ints (first, stop)"),
        ({"block_range": 5}, "block_range=5 must be None or a pair of ints"),
        ({"block_range": (1.5, 3)}, "block_range=(1.5, 3) must be None or a pair of ints"),
        ({"block_range": ("a", "b")}, "block_range=('a', 'b') must be None or a pair of ints"),
        ({"seed": 1.0}, "seed=1.0 must be a non-negative int"),
        ({"merge_attn": False}, "at least one of merge_attn, merge_crossattn, merge_mlp must be True"),
        ({"seed": -1}, "seed=-1 must be a non-negative int"),
        ({"ratio": "0.5"}, "ratio='0.5' must be a number"),
        ({"pool_factor": True}, "pool_factor=True must be a number"),
        ({"proportional_attention": "no"}, "proportional_attention='no' must be True or False"),
        ({"merge_mlp": 1}, "merge_mlp=1 must be True or False"),
        ({"ratio": 0.9, "sx": 4}, "allowed 0 <= ratio <= 0.875 for method='importance' with 4x2 cells"),
        (
            {"ratio": 0.6, "dst_selection": "random", "dst_fraction": 0.5},
            "allowed 0 <= ratio <= 0.5 for method='importance' with dst_selection='random', dst_fraction=0.5",
        ),
        ({"merge_start_step": -1}, "importance_start_step=2 and merge_start_step=-1 must both be >= 0"),
        ({"similarity_chunk": 0}, "similarity_chunk=0 must be >= 1"),
    ],
)
def test_bad_values_are_refused_with_what_is_allowed(options, message):
    with pytest.raises(ValueError) as error:
        MergeConfig(**options)
    assert message in str(error.value)


def test_a_block_range_list_is_kept_as_a_tuple():
    config = MergeConfig(block_range=[7, 21])
    assert config.block_range == (7, 21) and config == MergeConfig(block_range=(7, 21))
    assert hash(config) == hash(MergeConfig(block_range=(7, 21)))


def test_max_ratio_depends_on_the_partition():
    assert MergeConfig().max_ratio == 0.75  # one destination per 2x2 cell
    assert MergeConfig(dst_selection="random", dst_fraction=0.3).max_ratio == pytest.approx(0.7)
    assert MergeConfig(sx=3, sy=1).max_ratio == pytest.approx(2 / 3)
    # Warm-up steps and ToMeSD fallbacks partition into cells whatever dst_selection says: their bound holds
    assert MergeConfig(dst_selection="random", dst_fraction=0.2).max_ratio == 0.75
    assert MergeConfig(dst_selection="topk", dst_fraction=0.1, sx=4, sy=4).max_ratio == pytest.approx(0.9)


def test_presets_are_valid_and_replace_checks_names():
    assert PRESETS["pixart"].block_range == (7, 21) and PRESETS["unet"] == MergeConfig()
    assert PRESETS["unet"].replace(ratio=0.7).ratio == 0.7
    with pytest.raises(TypeError, match="unknown MergeConfig option"):
        PRESETS["unet"].replace(rato=0.7)


def test_auto_fallback_is_random_without_and_tome_with_proportional_attention():
    assert MergeConfig().fallback == "auto" and MergeConfig().fallback_partition == "random"
    assert MergeConfig(proportional_attention=True).fallback_partition == "tome"
    assert MergeConfig(proportional_attention=True, fallback="random").fallback_partition == "random"
    assert MergeConfig(fallback="tome").fallback_partition == "tome"


def test_numpy_scalars_become_python_numbers():
    """A NumPy scalar passes the type checks, but in its own width it wraps around where the patch multiplies
    or hashes it (np.int8 cells, np.int32 seeds): the config keeps plain ints and floats."""
    np = pytest.importorskip("numpy")
    config = MergeConfig(
        ratio=np.float32(0.5),
        dst_fraction=np.float16(0.25),
        pool_factor=np.float64(1.4),
        sx=np.int8(2),
        sy=np.uint8(2),
        importance_start_step=np.int16(1),
        merge_start_step=np.int32(3),
        max_downsample=np.int64(2),
        seed=np.int32(7),
        similarity_chunk=np.int32(1 << 20),
    )
    numbers = ("ratio", "dst_fraction", "pool_factor", "sx", "sy", "importance_start_step")
    for name in (*numbers, "merge_start_step", "max_downsample", "seed", "similarity_chunk"):
        assert type(getattr(config, name)) in (int, float), name
    assert config == MergeConfig(
        ratio=0.5,
        pool_factor=1.4,
        importance_start_step=1,
        merge_start_step=3,
        max_downsample=2,
        seed=7,
        similarity_chunk=1 << 20,
    )


@pytest.mark.parametrize("name", ["ratio", "pool_factor", "dst_fraction"])
def test_an_int_too_large_for_a_float_is_refused_as_out_of_range(name):
    with pytest.raises(ValueError, match=f"{name}=inf"):
        MergeConfig(**{name: 10**400})
