"""`imptome bench speed`: exact FLOP counts of merged steps (regressions show here, not in timings), the
variants' mid-generation state, and the command end to end on tiny architectures."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import imptome
from imptome.bench import archs, denoisers
from imptome.bench.flops import flop_counter
from imptome.bench.generation import generation_variants, sd_pipeline
from imptome.bench.operators import OperatorCounter
from imptome.bench.speed import Variant, _denoiser_call, host_timed_call, markdown_table
from imptome.bench.timing import round_order
from imptome.cli import CliError, build_parser, main
from imptome.commands.speed import VARIANTS
from imptome.commands.speed import check as check_speed_arguments
from imptome.merge import cfg_importance
from imptome.patch.api import patch_state
from tests.factories import PIXART_CONFIG, tiny_sd_unet_config

# The tiny UNet of tests/factories.py: top level 16 x 16 = 256 tokens, 32 channels, 2 heads; five
# self-attentions there (2 down, 3 up).
TINY_UNET = tiny_sd_unet_config()
# PixArt-shaped with PixArt-alpha's 28 blocks (the preset merges blocks 7-20), 32 wide.
TINY_PIXART = {**PIXART_CONFIG, "num_layers": 28}
TINY_ARCHS = {
    "tiny-sd": archs.ArchSpec(
        name="tiny-sd",
        model_kind="sd",
        config=TINY_UNET,
        resolutions=(128,),
        text_seq_len=77,
        text_embed_dim=32,
    ),
    "tiny-pixart": archs.ArchSpec(
        name="tiny-pixart",
        model_kind="pixart",
        config=TINY_PIXART,
        resolutions=(128,),
        text_seq_len=16,
        text_embed_dim=32,
    ),
}
N, CHANNELS, LAYERS, ROWS = 256, 32, 5, 2


@contextmanager
def registered() -> Iterator[None]:
    """The tiny architectures in `archs.ARCHS` for the duration."""
    archs.ARCHS.update(TINY_ARCHS)
    try:
        yield
    finally:
        for name in TINY_ARCHS:
            archs.ARCHS.pop(name, None)


@pytest.fixture
def tiny_archs():
    with registered():
        yield


@pytest.fixture(scope="module")
def unet():
    with registered():
        return denoisers.build_denoiser("tiny-sd")


def count_flops(fn) -> int:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def count_operators(fn) -> Counter[str]:
    with OperatorCounter() as counter:
        fn()
    return counter.names


def tiny_sd_inputs() -> dict:
    with registered():
        return denoisers.example_inputs("tiny-sd", 128)


def self_attention_flops(tokens: int) -> int:
    """q, k, v and output projections (32 -> 32) plus attention over `tokens` tokens, both CFG rows."""
    projections = 4 * 2 * ROWS * tokens * CHANNELS * CHANNELS
    attention = 4 * ROWS * tokens * tokens * CHANNELS  # QK^T and AV, summed over heads
    return projections + attention


def similarity_flops(rows: int) -> int:
    """One plan's cosine-similarity product: (N - D) sources x D destinations x C channels per row."""
    dst = N // 4
    return 2 * rows * (N - dst) * dst * CHANNELS


def step_flops(model: torch.nn.Module, inputs: dict, variant: Variant) -> int:
    call = _denoiser_call(model, inputs)
    with torch.inference_mode():
        importance = cfg_importance(call()[0], 4)
        with variant.applied(model, importance, timestep=500.0):
            return count_flops(call)


def saved_flops(ratio: float) -> int:
    """What merging the five top-level self-attentions at `ratio` saves (merge overhead excluded)."""
    kept = N - math.floor(N * ratio)
    return LAYERS * (self_attention_flops(N) - self_attention_flops(kept))


def test_merged_step_flops_follow_the_attention_formula(unet):
    unet.set_attn_processor(AttnProcessor2_0())
    inputs = tiny_sd_inputs()
    flops = {name: step_flops(unet, inputs, Variant(name, 0.7)) for name in VARIANTS}
    saved = saved_flops(0.7)
    # imptome plans once per step on the conditional half (U = 1 row); per layer with plan_scope="layer";
    # tomesd plans in every layer on both CFG rows.
    assert flops["tome"] == flops["none"] - saved + similarity_flops(1)
    assert flops["importance"] == flops["none"] - saved + similarity_flops(1)
    assert flops["importance-per-layer"] == flops["none"] - saved + LAYERS * similarity_flops(1)
    assert flops["tomesd"] == flops["none"] - saved + LAYERS * similarity_flops(2)
    assert flops["importance"] < flops["none"] - 0.95 * saved  # planning costs under 5% of the saving


def test_math_attention_counts_the_same(unet):
    """diffusers' explicit baddbmm + softmax + bmm attention gives the same counts as SDPA."""
    unet.set_attn_processor(AttnProcessor())
    inputs = tiny_sd_inputs()
    none, merged = (step_flops(unet, inputs, Variant(name, 0.5)) for name in ("none", "importance"))
    assert merged == none - saved_flops(0.5) + similarity_flops(1)


def test_flop_counter_counts_cpu_attention():
    q = torch.randn(2, 3, 10, 8)
    assert (
        count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
        == 4 * 2 * 3 * 10 * 10 * 8
    )


@pytest.mark.parametrize("count", [2, 5, 11])
def test_round_order_balances_positions_over_each_pair_of_rounds(count):
    """Rounds come in pairs (a rotation, then the same rotation reversed): over each pair every variant's
    mean position in the round is the middle, so a steady drift weighs on every variant alike, and the
    pairs rotate, so the variants change neighbours."""
    variants = list(range(count))
    orders = [round_order(variants, index) for index in range(6)]
    assert all(sorted(order) == variants for order in orders)
    for first, second in zip(orders[::2], orders[1::2], strict=True):
        assert all(first.index(v) + second.index(v) == count - 1 for v in variants)
    assert len({tuple(order) for order in orders[::2]}) == min(count, 3)


def test_variants_run_as_in_mid_generation(unet):
    unet.set_attn_processor(AttnProcessor2_0())
    call = _denoiser_call(unet, tiny_sd_inputs())
    with torch.inference_mode():
        importance = cfg_importance(call()[0], 4)
        for name, scope_plans in (("importance", 1), ("importance-per-layer", LAYERS), ("tome", 1)):
            with Variant(name, 0.7).applied(unet, importance, timestep=500.0):
                for _ in range(2):  # a second call at the same timestep stays in the same state
                    call()
                    records = imptome.merge_plan(unet)
                    assert len(records) == scope_plans
                    assert not any(record.pruned for record in records)
                    uses_map = [record.importance is not None for record in records]
                    assert uses_map == [name != "tome"] * scope_plans
            assert not imptome.is_patched(unet)


def test_proportional_attention_mid_generation_reads_the_processors():
    """`importance-prop` entered mid-generation gives its mask the dtype of the attention scores, as a
    generation's first call would: float32 where the math processor upcasts bfloat16 scores (SD2's
    `upcast_attention`), which the benchmark once missed, so the row failed as if the variant did not run."""
    unet = UNet2DConditionModel(**TINY_UNET, upcast_attention=True).eval().to(torch.bfloat16)
    unet.set_attn_processor(AttnProcessor())
    with registered():
        call = _denoiser_call(unet, denoisers.example_inputs("tiny-sd", 128, dtype=torch.bfloat16))
    with torch.inference_mode():
        importance = cfg_importance(call()[0].float(), 4)
        with Variant("importance-prop", 0.5).applied(unet, importance, timestep=500.0):
            merged = call()[0]
            (record,) = imptome.merge_plan(unet)
            assert (record.roles == 0).any()  # merged
    assert merged.dtype == torch.bfloat16 and torch.isfinite(merged).all()


@pytest.mark.parametrize(("arch", "merged_layers"), [("tiny-sd", LAYERS), ("tiny-pixart", 28)])
def test_a_merged_step_adds_two_operators_per_layer_and_a_fixed_cost(arch, merged_layers):
    """On a GPU every operator is a launch that the host issues, and an eager step of a large model is often
    bound by the host. A merged step adds one merge and one unmerge per merged layer, plus a per-step cost
    (the importance map, one plan, call bookkeeping) that does not grow with the layers: 48 operators on
    both models in a steady step (PixArt's patch pools the map to its token grid; the UNet's plan record
    keeps a copy of the map instead). A change that needs more should say why."""
    with registered():
        model = denoisers.build_denoiser(arch)
        call = _denoiser_call(model, denoisers.example_inputs(arch, 128))
    with torch.inference_mode():
        importance = cfg_importance(call()[0], 4)
        unmerged = count_operators(call)
        with Variant("importance", 0.7).applied(model, importance, timestep=500.0):
            call()  # one-time work: the call key's buffer, the shared index tensors of planning
            merged = count_operators(call)
    added = merged.copy()
    added.subtract(unmerged)
    assert added["embedding_bag"] == added["index_select"] == merged_layers
    fixed = added.total() - 2 * merged_layers
    assert 0 < fixed <= 48, f"{fixed} operators: {+added}"


def test_example_inputs_are_a_cfg_batch():
    for name in ("sd2", "pixart-alpha"):
        kwargs = denoisers.example_inputs(name, 64)
        latent = kwargs["hidden_states"] if name == "pixart-alpha" else kwargs["sample"]
        text = kwargs["encoder_hidden_states"]
        assert torch.equal(latent[0], latent[1]) and not torch.equal(text[0], text[1])


def test_command_end_to_end(tiny_archs, tmp_path, capsys):
    out = tmp_path / "speed.json"
    code = main(
        ["bench", "speed", "--arch", "tiny-sd", "tiny-pixart", "--ratios", "0.5", "--rounds", "1"]
        + ["--generation-steps", "4", "--threads", "1", "--json", str(out)]
    )
    assert code == 0
    results = json.loads(out.read_text())
    rows = results["rows"]
    assert [(row["arch"], row["variant"]) for row in rows] == [
        (arch, variant) for arch in ("tiny-sd", "tiny-pixart") for variant in VARIANTS
    ]
    fields = ("res", "ratio", "median_s", "speedup", "flops", "ideal_speedup", "efficiency", "overhead_frac")
    fields += ("operators", "added_operators")
    for row in rows:
        assert row["device"] == "cpu" and row["res"] == 128
        assert all(key in row for key in (*fields, "peak_mem_bytes"))
        runs = not (row["arch"] == "tiny-pixart" and row["variant"] == "tomesd")
        assert (row["error"] is None) == runs, row["error"]
        if runs:
            assert row["median_s"] > 0 and row["flops"] > 0 and row["speedup"] > 0
            assert row["round_speedups"] == [pytest.approx(row["speedup"])]  # one round: the same ratio
            assert row["ideal_speedup"] > 1 or row["variant"] == "none"
            assert 0 <= row["overhead_frac"] < 1
            own_work = {kind for kind, seconds in row["overhead_breakdown_s"].items() if seconds > 0}
            if row["variant"] != "none":  # the timer saw the method's own functions run (imptome's
                # denoiser hooks, timed as "importance", and layer hooks run for tome too)
                hooks = set() if row["variant"] == "tomesd" else {"importance", "hooks"}
                assert own_work == {"planning", "merge"} | hooks, row["variant"]
            assert row["operators"] > 0
            assert row["added_operators"] > 0 or row["variant"] == "none"
    generations = results["generation_rows"]  # SD UNets only
    assert [(row["arch"], row["variant"], row["ratio"]) for row in generations] == [
        ("tiny-sd", "none", 0),
        ("tiny-sd", "deepcache", 0),
        ("tiny-sd", "importance", 0.5),
        ("tiny-sd", "deepcache+importance", 0.5),
    ]
    assert all(row["steps"] == 4 and row["median_s"] > 0 for row in generations)
    table = out.with_suffix(".md").read_text()
    assert "| tiny-sd | 128 | importance | 0.5 |" in table and "does not run" in table
    assert "| median s/step |" in table and "peak resident memory, weights included" in table
    assert "1 round(s) only: each median rests on so few steps" in table
    assert "round 1/1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "method", "plan_scope", "proportional"),
    [
        ("tome", "tome", "step", False),
        ("importance", "importance", "step", False),
        ("importance-per-layer", "importance", "layer", False),
        ("importance-prop", "importance", "step", True),
    ],
)
def test_each_imptome_variant_is_its_family_preset_with_what_it_names(name, method, plan_scope, proportional):
    config = Variant(name, 0.6).config("pixart")
    assert (config.method, config.plan_scope) == (method, plan_scope)
    assert config.proportional_attention is proportional
    assert config.ratio == 0.6 and config.block_range == imptome.PRESETS["pixart"].block_range


def test_generation_variants_apply_what_they_name(unet):
    """Each whole-generation variant changes the latents in its own way (DeepCache's reuse, imptome's
    merge, both) while it is applied, and leaves the pipeline as it was."""
    pipe = sd_pipeline(unet)
    uncond, cond = tiny_sd_inputs()["encoder_hidden_states"].chunk(2)

    def generate() -> torch.Tensor:
        kwargs = {"prompt_embeds": cond, "negative_prompt_embeds": uncond, "height": 128, "width": 128}
        generator = torch.Generator().manual_seed(0)
        return pipe(**kwargs, num_inference_steps=6, generator=generator, output_type="latent").images

    plain = generate()
    outputs = {}
    for variant in generation_variants([0.5]):
        with variant.applied(pipe):
            assert imptome.is_patched(pipe) == ("importance" in variant.name)
            outputs[variant.name] = generate()
        assert not imptome.is_patched(pipe) and torch.equal(generate(), plain)
    assert torch.equal(outputs.pop("none"), plain)
    values = list(outputs.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1 :] + [plain])


def test_table_notes_explain_efficiencies_above_1_and_few_rounds():
    row = {"arch": "sd2", "res": 768, "variant": "importance", "ratio": 0.7, "error": None, "median_s": 1.0}
    row |= {"iqr_s": 0.1, "speedup": 1.4, "flops": 3e12, "ideal_speedup": 1.3, "device": "cuda", "rounds": 5}
    row |= {"efficiency": 1.4 / 1.3}
    table = markdown_table([row])
    assert "An efficiency above 1: the FLOP count sees matrix products only" in table
    assert "round(s) only" not in table
    table = markdown_table([row | {"efficiency": 0.9, "rounds": 2}])
    assert "An efficiency above 1" not in table and "2 round(s) only" in table


def test_channels_last_memory_format(tiny_archs, tmp_path):
    """--memory-format channels_last lays out the weights and the latent as NHWC: same FLOPs, recorded in the
    rows and in the command that repeats the run."""
    flops = {}
    for memory_format in ("contiguous", "channels_last"):
        out = tmp_path / f"{memory_format}.json"
        argv = ["bench", "speed", "--arch", "tiny-sd", "--ratios", "0.5", "--variants", "none", "importance"]
        assert main([*argv, "--rounds", "1", "--memory-format", memory_format, "--json", str(out)]) == 0
        results = json.loads(out.read_text())
        assert all(row["memory_format"] == memory_format and row["error"] is None for row in results["rows"])
        assert ("--memory-format" in results["meta"]["command"]) == (memory_format == "channels_last")
        flops[memory_format] = [row["flops"] for row in results["rows"]]
    assert flops["channels_last"] == flops["contiguous"]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--arch", "flux"], "unknown --arch flux"),
        (["--ratios", "0.8"], "allowed 0 < ratio <= 0.75"),
        (["--variants", "fast"], "unknown --variants fast"),
        (["--res", "500"], "multiples of 8"),
        (["--rounds", "0"], "at least 1"),
        (["--threads", "0"], "--threads 0: need at least 1"),
        (["--arch", "SD3", "--attention", "math"], "sd3 has SDPA joint attention only"),  # any case
        (["--generation-steps", "2"], "at least 4"),
        (["--arch", "sd3", "--attention", "math"], "sd3 has SDPA joint attention only"),
        (["--arch", ","], "--arch ,: no value given (leave --arch out for its default)"),
        (["--ratios", ","], "--ratios ,: no value given"),
        (["--arch", "sdxl", "pixart-alpha", "--generation-steps", "8"], "timed on sd15, sd2 only"),
        (["--json", "{tmp}"], "is a folder; name a file"),
        (
            ["--json", "{tmp}/r.md"],
            "(default: --json with .md) {tmp}/r.md: --json writes that",
        ),
        (["--json", "{tmp}/a.json", "--markdown", "{tmp}/a.json"], "--markdown {tmp}/a.json: --json writes"),
        (["--json", "{tmp}/file.txt/r.json"], "{tmp}/file.txt is a file, not a folder"),
        (["--json", "/proc/x/r.json"], "--json /proc/x/r.json: cannot write in /proc"),  # even as root
    ],
)
def test_bad_input_is_a_clear_error(option, message, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("")
    option = [part.format(tmp=tmp_path) for part in option]
    assert main(["bench", "speed", *option]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


@pytest.mark.parametrize("name", ["speed.json", "speed.md"])
def test_an_interrupted_write_leaves_the_previous_results_whole(name, tmp_path, interrupt_writes):
    """The results are rewritten after every case: a Ctrl-C while one was written left it cut."""
    from imptome.bench.speed import _write

    meta = {"device_name": "a CPU", "device": "cpu", "dtype": "float32", "attention": "sdpa", "rounds": 1}
    meta |= {"memory_format": "contiguous", "loadavg_start": [0.5], "command": "imptome bench speed"}
    paths = tmp_path / "speed.json", tmp_path / "speed.md"
    _write(*paths, meta, [], [])
    before = (tmp_path / name).read_bytes()
    interrupt_writes(tmp_path / name)
    with pytest.raises(KeyboardInterrupt):
        _write(*paths, {**meta, "command": "imptome bench speed --rounds 2"}, [], [])
    assert (tmp_path / name).read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_more_threads_than_cpus_are_refused(monkeypatch):
    """torch.set_num_threads takes any number: a few threads more than CPUs only time their contention, and
    --threads 100000 failed with a traceback deep in torch (no memory for the threads)."""
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    argv = ["bench", "speed", "--arch", "sd15", "--threads"]
    with pytest.raises(CliError, match=r"^--threads 5: this machine has 4 CPUs; give at most 4$"):
        check_speed_arguments(build_parser([*argv, "5"]).parse_args([*argv, "5"]))
    check_speed_arguments(build_parser([*argv, "4"]).parse_args([*argv, "4"]))


@pytest.mark.parametrize(
    ("arch", "res", "message"),
    [
        ("pixart-alpha", "8", "--res 8: image sizes for pixart-alpha must be positive multiples of 16 px"),
        ("pixart-alpha", "1000", "--res 1000: image sizes for pixart-alpha must be positive multiples of 16"),
        ("sd3", "520", "--res 520: image sizes for sd3 must be positive multiples of 16 px"),
        ("sd3", "3088", "--res 3088: sd3 takes at most 3072 px (its position embeddings)"),
    ],
)
def test_patch_transformers_refuse_sizes_their_patches_do_not_tile(arch, res, message):
    """PixArt and SD3 cut a latent side that is not a multiple of the patch to fewer tokens (PixArt then
    returns a smaller latent: the row would name a size it did not time) or fail deep in torch (8 px: a
    1x1 latent under a 2x2 patch; SD3 past its position-embedding table): refused before building."""
    argv = ["bench", "speed", "--arch", arch, "--res", res]
    args = build_parser(argv).parse_args(argv)
    with pytest.raises(CliError, match=re.escape(message)):
        check_speed_arguments(args)
    ok = ["bench", "speed", "--arch", arch, "--res", "1024"]
    check_speed_arguments(build_parser(ok).parse_args(ok))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--arch", "sd15", "SD15"], "--arch lists sd15 more than once; give each once"),
        (["--res", "512,512"], "--res lists 512 more than once; give each once"),
        (["--ratios", "0.5", "0.50"], "--ratios lists 0.5 more than once; give each once"),
        (["--variants", "tome", "importance", "tome"], "--variants lists tome more than once"),
        # would be ignored: no video denoiser to take the frames
        (["--arch", "sd15", "--frames", "4"], "--frames 4: only the video denoisers (animatediff, svd) take"),
    ],
)
def test_repeated_or_ignored_values_are_refused(option, message):
    """A repeat would run a case or variant twice and write two rows for one (arch, res, variant, ratio);
    --frames without a video denoiser would be dropped (and still named in the recorded command)."""
    argv = ["bench", "speed", *option]
    with pytest.raises(CliError, match=re.escape(message)):
        check_speed_arguments(build_parser(argv).parse_args(argv))
    argv = ["bench", "speed", "--arch", "sd15", "svd", "--frames", "4"]  # one video denoiser suffices
    check_speed_arguments(build_parser(argv).parse_args(argv))


def test_timings_on_a_busy_machine_come_with_a_caution(monkeypatch):
    from imptome.bench import timing

    monkeypatch.setattr(timing.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert timing.busy_machine_note() is None
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (4.2, 1.0, 1.0))
    assert timing.busy_machine_note().endswith(
        "load average 4.2 on 2 cores): other work stalls some timed "
        "calls, so these times and speedups are unreliable; rerun on an idle machine"
    )  # demo, bench quality
    assert timing.busy_machine_note("or with more --rounds").endswith("unreliable; or with more --rounds")


def test_tomesd_without_its_package_is_named_or_left_out(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *rest: None if name == "tomesd" else find_spec(name, *rest)
    )
    assert main(["bench", "speed", "--variants", "none", "tomesd"]) == 2
    assert (
        "--variants tomesd needs the tomesd package: pip install 'imptome[bench]'" in capsys.readouterr().err
    )
    argv = ["bench", "speed", "--arch", "sd15"]
    args = build_parser(argv).parse_args(argv)
    check_speed_arguments(args)
    assert "tomesd" not in args.variant_names and len(args.variant_names) > 1  # the default list


def test_table_notes_leave_out_the_none_row_and_name_the_fewest_rounds():
    none = {"arch": "sd2", "res": 768, "variant": "none", "ratio": 0.0, "error": None, "median_s": 1.0}
    none |= {"iqr_s": 0.1, "speedup": 1.0, "flops": 3e12, "ideal_speedup": 1.0, "efficiency": 1.0}
    merged = none | {"variant": "importance", "ratio": 0.7, "speedup": 1.2, "ideal_speedup": 1.3}
    merged |= {"efficiency": 1.2 / 1.3, "rounds": 5}
    table = markdown_table([none | {"rounds": 3}, merged])  # efficiency 1 is not above 1; 3 rounds suffice
    assert "An efficiency above 1" not in table and "round(s) only" not in table
    assert "2 round(s) only" in markdown_table([none | {"rounds": 2}, merged])


def test_host_timed_call_syncs_only_around_the_call(unet, monkeypatch):
    """The GPU's host-time measurement: an unsynced timer still sees every kind of imptome's own work, and the
    device is synchronised twice (before and after the whole call), not around each function as the synced
    timer does, which would stop the host running ahead of the kernels it issues."""
    from imptome.bench import speed, timing

    syncs = []
    monkeypatch.setattr(timing, "synchronize", lambda device: syncs.append("work"))
    monkeypatch.setattr(speed, "synchronize", lambda device: syncs.append("call"))
    unet.set_attn_processor(AttnProcessor2_0())
    call = _denoiser_call(unet, tiny_sd_inputs())
    device = torch.device("cpu")
    with torch.inference_mode():
        importance = cfg_importance(call()[0], 4)
        with Variant("importance", 0.7).applied(unet, importance, timestep=500.0):
            call()
            synced, unsynced = timing.WorkTimer(device), timing.WorkTimer(device, synced=False)
            step_s, own_work = host_timed_call(call, unsynced, unsynced.imptome(unet))
            assert syncs == ["call", "call"]
            assert step_s > 0 and set(own_work) == {"importance", "planning", "merge", "hooks"}
            assert 0 < sum(own_work.values()) < step_s
            host_timed_call(call, synced, synced.imptome(unet))
            # the denoiser's two hooks with begin_call and end_call, every hooked layer's two hooks (the self-
            # attentions of all levels: 11), and per merged layer plan_for (planning or a look-up), merge and
            # unmerge
            assert syncs.count("work") == 2 * (4 + 2 * 11 + 3 * LAYERS)


def test_a_variant_starts_past_the_generations_first_calls(unet):
    """The timed call is a later call of a generation, as a pipeline makes most of them: the batch layout that
    the generation's first two calls found is kept without comparing the CFG halves again (on a GPU a wait),
    the timestep is the call's own tensor, and the step merges with importance."""
    inputs = tiny_sd_inputs()
    call = _denoiser_call(unet, inputs)
    with torch.inference_mode():
        importance = cfg_importance(call()[0], 4)
        variant = Variant("importance", 0.7)
        with variant.applied(unet, importance, inputs["timestep"], inputs["sample"]):
            operators = count_operators(call)
            state = patch_state(unet)
            assert state is not None and state.use_importance and state.cfg
        with variant.applied(unet, importance, inputs["timestep"]):  # no sample: a first call compares
            assert count_operators(call)["equal"] == 1
    assert operators["equal"] == 0 and operators["embedding_bag"] == LAYERS


def test_table_shows_the_host_share_of_gpu_rows():
    row = {"arch": "sd2", "res": 1024, "variant": "importance", "ratio": 0.7, "error": None, "median_s": 0.04}
    row |= {"iqr_s": 0.001, "speedup": 1.03, "flops": 3e12, "ideal_speedup": 1.5, "device": "cuda"}
    row |= {"rounds": 7}
    row |= {"efficiency": 0.69, "overhead_frac": 0.093, "overhead_host_frac": 0.031, "host_step_s": 0.038}
    table = markdown_table([row])
    assert "| 9.3% (host 3.1%) |" in table
    assert "host-bound): sd2 1024 importance 0.7: 95%." in table
    cpu_row = row | {"device": "cpu", "overhead_host_frac": None, "host_step_s": None}
    table = markdown_table([cpu_row])
    assert "| 9.3% |" in table and "host-bound" not in table


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_rows_carry_the_host_time(tiny_archs, tmp_path):
    out = tmp_path / "speed.json"
    argv = ["bench", "speed", "--arch", "tiny-sd", "--ratios", "0.5", "--variants", "none", "importance"]
    assert main([*argv, "--rounds", "1", "--device", "cuda", "--json", str(out)]) == 0
    none, merged = json.loads(out.read_text())["rows"]
    assert none["host_step_s"] > 0 and none["overhead_host_s"] == 0
    assert 0 < merged["overhead_host_s"] < merged["host_step_s"]
    assert merged["overhead_host_frac"] == pytest.approx(merged["overhead_host_s"] / merged["median_s"])
    by_kind = merged["overhead_host_breakdown_s"]
    assert set(by_kind) == {"importance", "planning", "merge", "hooks"} and all(by_kind.values())
    assert sum(by_kind.values()) == pytest.approx(merged["overhead_host_s"], rel=0.5)  # medians by kind
