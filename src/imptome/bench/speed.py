"""`imptome bench speed`: denoiser step time, FLOPs and efficiency of token merging at real model sizes.

For every (architecture, resolution) the denoiser is built once from the configs in `imptome.bench.archs`
(random weights, see `imptome.bench.denoisers`: speed does not depend on their values) and called on one
classifier-free-guidance batch, [uncond, cond] as a pipeline sends it. Variants:

- ``none``: the unmerged model.
- ``tome``, ``importance``, ``importance-per-layer``: imptome with the family's preset (`imptome.PRESETS`)
  at the given ratio; method "tome", or "importance" planning once per token grid per step
  (``plan_scope="step"``, the default) or in every block (``plan_scope="layer"``). Each is timed at a
  mid-generation step: past the warm-up schedule, with the previous step's importance map, and past the
  generation's first two calls (which compare the CFG halves and copy the timesteps to the host, on a GPU
  waiting for it; later calls keep what they found).
- ``importance-prop``: ``importance`` with ``proportional_attention=True`` (an additive attention mask).
- ``tomesd``: the tomesd package at the same ratio and on the same UNet level, where it runs (it does not
  on PixArt, AnimateDiff or SVD); a failure is recorded in the row's ``error``.

Every variant is called twice as warm-up, the first call under a FLOP counter, the second (a steady step:
one-time work such as the shared index tensors of planning is done) under an operator counter; then
``--rounds`` rounds call each variant once, the order rotating every round, with the device synchronised
around each call. Reported per row: median step seconds and spread, speedup = median(none) / median(variant)
of the same run, FLOPs per step (merge overhead included), ideal speedup = FLOPs(none) / FLOPs(variant),
efficiency = speedup / ideal, peak memory, the seconds spent in the method's own work (``overhead_frac`` = own
work / median step; for imptome its hooks' own logic too, ``overhead_breakdown_s["hooks"]``),
and the tensor operators a step dispatches, views left out (``operators``;
``added_operators`` over ``none``): on a GPU each is a launch the host issues, the cost of a method's own work
when an eager step is host-bound.
On the CPU own work is timed in the timed calls; on a GPU in one extra call with syncs around each function
(see `imptome.bench.timing`), an upper bound because the syncs stop that work overlapping with the rest, and
in three more calls without syncs, the host's time only (``overhead_host_frac``, ``host_step_s``: the host's
time to issue the whole step; ``overhead_host_breakdown_s`` by kind). When ``host_step_s`` is close to the
step's time, the step is bound by the host and the host's share is what the own work costs it; when it is
well below, the GPU is the bottleneck and the synced share is the closer bound.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import imptome
from imptome.bench.archs import ARCHS, ArchSpec
from imptome.bench.baseline import tomesd_patched
from imptome.bench.denoisers import build_denoiser, example_inputs
from imptome.bench.flops import flop_counter
from imptome.bench.generation import GUIDANCE, measure_generations
from imptome.bench.operators import OperatorCounter
from imptome.bench.timing import (
    PeakMemory,
    WorkTimer,
    busy_machine_note,
    package_versions,
    quartiles,
    round_order,
    synchronize,
)
from imptome.commands.speed import DEEPCACHE_INTERVAL, MEMORY_FORMATS
from imptome.config import PRESETS, MergeConfig
from imptome.files import write_atomically
from imptome.loading import DTYPES, check_device
from imptome.merge import cfg_importance
from imptome.patch.api import patch_state
from imptome.patch.families import DenoiserInfo, denoiser_info, finest_attention_downsample

#: torch's memory format of each --memory-format choice
TORCH_MEMORY_FORMATS = dict(zip(MEMORY_FORMATS, (torch.contiguous_format, torch.channels_last), strict=True))
#: on a GPU, untimed calls whose own work and whole step are timed on the host, without syncs
HOST_TIMED_CALLS = 3


# ------------------------------------------------------------------------------------------------ variants


@dataclass(frozen=True)
class Variant:
    name: str  # a VARIANTS entry
    ratio: float  # 0 for "none"

    @property
    def label(self) -> str:
        return self.name if self.name == "none" else f"{self.name}@{self.ratio:g}"

    def config(self, family: str) -> MergeConfig:
        preset = PRESETS[family]
        if self.name == "tome":
            return preset.replace(ratio=self.ratio, method="tome")
        scope = "layer" if self.name == "importance-per-layer" else "step"
        return preset.replace(
            ratio=self.ratio,
            method="importance",
            plan_scope=scope,
            proportional_attention=self.name == "importance-prop",
        )

    @contextmanager
    def applied(
        self,
        model: torch.nn.Module,
        importance: torch.Tensor | None,
        timestep: torch.Tensor | float,
        sample: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """The variant patched into `model` for the duration, in the state of a mid-generation step of calls
        with this `timestep` (the calls' own tensor) and, when given, this `sample` (see
        `_enter_mid_generation`)."""
        if self.name == "none":
            yield
        elif self.name == "tomesd":
            with tomesd_patched(model, self.ratio):
                yield
        else:
            assert importance is not None  # the map of the unmerged call ("none"), measured first
            imptome.apply_patch(model, self.config(denoiser_info(model).family))
            _enter_mid_generation(model, importance, timestep, sample)
            try:
                yield
            finally:
                imptome.remove_patch(model)


def _enter_mid_generation(
    model: torch.nn.Module,
    importance: torch.Tensor,
    timestep: torch.Tensor | float,
    sample: torch.Tensor | None,
) -> None:
    """Make a fresh patch behave as in the middle of a generation: past the warm-up schedule (merging, and
    with importance), holding the previous step's importance map, at the same timestep (no new generation),
    and with what a generation's first calls leave for the later ones, which on a GPU need not wait for it:
    the timestep tensor's memory copied to the host, and the batch layout (the CFG copies) that two calls in a
    row found, which is then kept without comparing `sample`'s chunks again. Without this the timed call
    would be a generation's first call on a GPU, waiting for the device twice."""
    state = patch_state(model)
    assert state is not None  # patched by the caller
    config = state.config
    state.start_generation()  # as a generation's first call would: reads the model's attention processors
    state.enter_step(max(config.importance_start_step, config.merge_start_step))
    state.importance = importance
    state.silent_units = (False,) * importance.shape[0]  # checked at the generation's first guided call
    state.last_timestep = state.read_timestep(timestep)
    state.compare_timestep_memory(timestep, state.last_timestep)
    if sample is not None:
        for _ in range(2):  # the generation's first two calls
            state._detect_copies(sample)


def parse_variants(names: list[str], ratios: list[float]) -> list[Variant]:
    """`none` once, every other name at every ratio."""
    variants = [Variant("none", 0.0)]
    for name in names:
        if name != "none":
            variants += [Variant(name, ratio) for ratio in ratios]
    return variants


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    archs: list[str]
    resolutions: dict[str, list[int]]
    variants: list[Variant]
    rounds: int
    device: torch.device
    dtype: str
    attention: str
    memory_format: str
    frames: int | None
    batch: int
    generation_steps: int


def _settings(args: argparse.Namespace) -> Settings:
    """The run's settings from `args` checked by `imptome.commands.speed.check`."""
    return Settings(
        archs=args.arch_list,
        resolutions=args.resolution_lists,
        variants=parse_variants(args.variant_names, args.ratio_list),
        rounds=args.rounds,
        device=torch.device(check_device(args.device)),
        dtype=args.dtype,
        attention=args.attention,
        memory_format=args.memory_format,
        frames=args.frames,
        batch=args.batch,
        generation_steps=args.generation_steps,
    )


# ------------------------------------------------------------------------------------------- measurement


@dataclass
class _Record:
    variant: Variant
    flops: int | None = None
    operators: int | None = None
    seconds: list[float] = field(default_factory=list)
    own_work: list[dict[str, float]] = field(default_factory=list)
    own_work_host: list[dict[str, float]] = field(default_factory=list)  # GPU only: unsynced, host time
    host_step: list[float] = field(default_factory=list)  # GPU only: seconds to issue a step, unsynced
    peak_mem: list[int] = field(default_factory=list)
    error: str | None = None


def _set_attention(model: Any, spec: ArchSpec, attention: str) -> None:  # a diffusers denoiser
    """SDPA or math processors everywhere; SD3 keeps its joint-attention processors (always SDPA, text and
    image tokens together; `imptome.commands.speed.check` refuses "math" for it)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if spec.model_kind != "sd3":
        model.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())


def step_importance(noise_pred: torch.Tensor, info: DenoiserInfo) -> torch.Tensor:
    """The CFG map a step's output [n, C, ...] (SVD: [n, F, C, ...]) leaves for the next step."""
    return cfg_importance(noise_pred.movedim(info.channel_dim, 1), info.noise_channels)


def _denoiser_call(model: torch.nn.Module, inputs: dict[str, Any]) -> Callable[[], Any]:
    """One call with the latent passed positionally, as pipelines do (tomesd reads it from the args)."""
    inputs = dict(inputs)
    latent = inputs.pop("hidden_states" if "hidden_states" in inputs else "sample")
    return lambda: model(latent, **inputs)


def _inputs(spec: ArchSpec, res: int, settings: Settings) -> dict[str, Any]:
    inputs = example_inputs(
        spec.name,
        res,
        batch=settings.batch,
        num_frames=settings.frames,
        dtype=DTYPES[settings.dtype],
        device=settings.device,
    )
    memory_format = TORCH_MEMORY_FORMATS[settings.memory_format]
    return {
        key: value.to(memory_format=memory_format)
        if isinstance(value, torch.Tensor) and value.ndim == 4
        else value
        for key, value in inputs.items()
    }


def host_timed_call(
    call: Callable[[], Any], timer: WorkTimer, instrumented: contextlib.AbstractContextManager
) -> tuple[float, dict[str, float]]:
    """One call timed on the host, the device synchronised before and after but not during it: the seconds
    the host took to issue the call, and the unsynced `timer`'s seconds of own work by kind."""
    timer.reset()
    synchronize(timer.device)
    start = time.perf_counter()
    with instrumented:
        call()
    step_s = time.perf_counter() - start
    synchronize(timer.device)
    return step_s, dict(timer.seconds)


def _measure_case(
    model: torch.nn.Module, spec: ArchSpec, res: int, settings: Settings, say: Callable[[str], None]
) -> list[_Record]:
    device = settings.device
    inputs = _inputs(spec, res, settings)
    timestep = inputs["timestep"]  # the calls' own tensor: read as a pipeline's calls read their timesteps
    sample = inputs["hidden_states" if "hidden_states" in inputs else "sample"]
    call = _denoiser_call(model, inputs)
    info = denoiser_info(model)
    timer, host_timer, peak = WorkTimer(device), WorkTimer(device, synced=False), PeakMemory(device)
    records = [_Record(variant) for variant in settings.variants]
    importance = None
    tag = f"[{spec.name} {res}px]"

    def instrumented(variant: Variant, work_timer: WorkTimer) -> contextlib.AbstractContextManager:
        if variant.name == "none":
            return contextlib.nullcontext()
        return work_timer.tomesd() if variant.name == "tomesd" else work_timer.imptome(model)

    for record in records:  # warm-up, FLOPs, and on a GPU the own-work call; "none" comes first
        variant = record.variant
        try:
            with variant.applied(model, importance, timestep, sample), torch.inference_mode():
                with flop_counter() as counter:
                    output = call()
                with OperatorCounter() as operators:
                    call()
                record.flops, record.operators = counter.get_total_flops(), operators.total
                if variant.name == "none":
                    importance = step_importance(output[0], info)
                if device.type == "cuda":
                    call()
                    timer.reset()
                    with instrumented(variant, timer):
                        call()
                    record.own_work.append(dict(timer.seconds))
                    for _ in range(HOST_TIMED_CALLS):
                        work = instrumented(variant, host_timer)
                        host_s, host_work = host_timed_call(call, host_timer, work)
                        record.host_step.append(host_s)
                        record.own_work_host.append(host_work)
        except Exception as error:  # a variant that does not run here (tomesd on PixArt) is reported
            if variant.name == "none":
                raise
            record.error = f"{type(error).__name__}: {error}"
            say(f"{tag} {variant.label}: does not run ({record.error})")
            continue
        per_step = f"{record.flops / 1e9:.1f} GFLOP, {record.operators} operators per step"
        say(f"{tag} warm-up {variant.label}: {per_step}")

    active = [record for record in records if record.error is None]
    for round_index in range(settings.rounds):
        for record in round_order(active, round_index):
            variant = record.variant
            with variant.applied(model, importance, timestep, sample), torch.inference_mode():
                timer.reset()
                with instrumented(variant, timer) if device.type == "cpu" else contextlib.nullcontext():
                    peak.reset()
                    synchronize(device)
                    start = time.perf_counter()
                    call()
                    synchronize(device)
                    seconds = time.perf_counter() - start
                memory = peak.read()
            record.seconds.append(seconds)
            if memory is not None:
                record.peak_mem.append(memory)
            if device.type == "cpu":
                record.own_work.append(dict(timer.seconds))
            say(f"{tag} round {round_index + 1}/{settings.rounds} {variant.label}: {seconds:.3f} s")
    return records


def _case_fields(spec: ArchSpec, res: int, settings: Settings) -> dict[str, Any]:
    return {
        "arch": spec.name,
        "res": res,
        "frames": (settings.frames or spec.num_frames) if spec.num_frames else None,
        "batch": 2 * settings.batch,
        "device": settings.device.type,
        "device_name": _device_name(settings.device),
        "dtype": settings.dtype,
        "attention": settings.attention,
        "memory_format": settings.memory_format,
    }


def _rows(
    records: list[_Record], spec: ArchSpec, res: int, settings: Settings, model: torch.nn.Module
) -> list[dict]:
    base = records[0]  # "none"
    base_median = statistics.median(base.seconds) if base.seconds else None
    tokens = spec.top_level_tokens(res)
    rows = []
    for record in records:
        variant = record.variant
        row: dict[str, Any] = {
            **_case_fields(spec, res, settings),
            "variant": variant.name,
            "ratio": variant.ratio,
            "tokens": tokens,
            "kept_tokens": tokens - math.floor(tokens * variant.ratio),
            "rounds": len(record.seconds),
            "error": record.error,
        }
        if record.error is None and record.seconds:
            median = statistics.median(record.seconds)
            q1, q3 = quartiles(record.seconds)
            # per round, against the unmerged call of the same round: less exposed to drift between rounds
            round_speedups = [b / t for b, t in zip(base.seconds, record.seconds, strict=True)]
            round_q1, round_q3 = quartiles(round_speedups)
            own = [sum(parts.values()) for parts in record.own_work]
            own_median = statistics.median(own) if own else 0.0
            own_host = [sum(parts.values()) for parts in record.own_work_host]
            own_host_median = statistics.median(own_host) if own_host else None
            kinds = sorted({kind for parts in record.own_work for kind in parts})
            assert record.operators is not None and base.operators is not None  # counted by every warm-up
            row.update(
                median_s=median,
                iqr_s=q3 - q1,
                min_s=min(record.seconds),
                max_s=max(record.seconds),
                times_s=record.seconds,
                speedup=base_median / median if base_median else None,
                round_speedups=round_speedups,
                round_speedup_median=statistics.median(round_speedups),
                round_speedup_iqr=round_q3 - round_q1,
                flops=record.flops,
                ideal_speedup=base.flops / record.flops if base.flops and record.flops else None,
                operators=record.operators,
                added_operators=record.operators - base.operators,
                overhead_s=own_median,
                overhead_frac=own_median / median,
                overhead_breakdown_s={
                    kind: statistics.median(parts.get(kind, 0.0) for parts in record.own_work)
                    for kind in kinds
                },
                overhead_host_s=own_host_median,
                overhead_host_breakdown_s={
                    kind: statistics.median(parts.get(kind, 0.0) for parts in record.own_work_host)
                    for kind in kinds
                }
                if record.own_work_host
                else None,
                overhead_host_frac=None if own_host_median is None else own_host_median / median,
                host_step_s=statistics.median(record.host_step) if record.host_step else None,
                peak_mem_bytes=max(record.peak_mem) if record.peak_mem else None,
            )
            if row["speedup"] is not None and row["ideal_speedup"]:
                row["efficiency"] = row["speedup"] / row["ideal_speedup"]
            else:
                row["efficiency"] = None
            if variant.name == "tomesd":
                row["max_downsample"] = finest_attention_downsample(model)
        else:
            row.update(
                median_s=None,
                speedup=None,
                flops=record.flops,
                ideal_speedup=None,
                operators=record.operators,
                added_operators=None,
                efficiency=None,
                overhead_frac=None,
                peak_mem_bytes=None,
            )
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- output


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model}, {threads} thread{'s' if threads > 1 else ''}"


def _command(args: argparse.Namespace, settings: Settings) -> str:
    """The command line that repeats this run's measurements (--json and --markdown, where the results
    go, are left for the reader to choose)."""
    parts = ["imptome", "bench", "speed", "--arch", *settings.archs]
    if args.res:  # one list for every architecture
        parts += ["--res", *map(str, settings.resolutions[settings.archs[0]])]
    ratios = sorted({variant.ratio for variant in settings.variants if variant.name != "none"})
    names = list(dict.fromkeys(variant.name for variant in settings.variants))
    parts += ["--ratios", *(f"{ratio:g}" for ratio in ratios)] if ratios else []
    parts += ["--variants", *names, "--rounds", str(settings.rounds), "--device", settings.device.type]
    parts += ["--dtype", settings.dtype, "--attention", settings.attention]
    if settings.memory_format != "contiguous":
        parts += ["--memory-format", settings.memory_format]
    if settings.frames:
        parts += ["--frames", str(settings.frames)]
    if settings.batch != 1:
        parts += ["--batch", str(settings.batch)]
    if settings.generation_steps:
        parts += ["--generation-steps", str(settings.generation_steps)]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    return shlex.join(parts)


def _meta(settings: Settings, command: str) -> dict[str, Any]:
    versions = {**package_versions("torch", "diffusers", "tomesd"), "imptome": imptome.__version__}
    return {
        "command": command,
        "device": settings.device.type,
        "device_name": _device_name(settings.device),
        "dtype": settings.dtype,
        "attention": settings.attention,
        "memory_format": settings.memory_format,
        "rounds": settings.rounds,
        "threads": torch.get_num_threads(),
        "versions": versions,
        "loadavg_start": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _per_round(row: dict) -> str:
    """The median of a row's per-round speedups and their IQR, e.g. "1.36x [0.04]"."""
    if row.get("round_speedup_median") is None:
        return "-"
    return f"{row['round_speedup_median']:.2f}x [{row['round_speedup_iqr']:.2f}]"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| arch | res | variant | ratio | median s/step | IQR s | speedup | per round [IQR] | GFLOP/step "
        "| ideal | efficiency | own work | operators (own) | peak mem GiB |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if row["error"] is not None:
            lines.append(
                f"| {row['arch']} | {row['res']} | {row['variant']} | {row['ratio']:g} "
                f"| does not run: {row['error'][:60]} |||||||||| "
            )
            continue
        own_work = _fmt(None if row.get("overhead_frac") is None else 100 * row["overhead_frac"], 1, "%")
        if row.get("overhead_host_frac") is not None and row["variant"] != "none":
            own_work += f" (host {100 * row['overhead_host_frac']:.1f}%)"
        memory = row.get("peak_mem_bytes")
        gflop = row["flops"] / 1e9 if row["flops"] else None
        operators = row.get("operators")
        if operators is not None and row["variant"] != "none":
            operators = f"{operators} (+{row['added_operators']})"
        lines.append(
            f"| {row['arch']} | {row['res']} | {row['variant']} | {row['ratio']:g} "
            f"| {_fmt(row['median_s'], 3)} | {_fmt(row.get('iqr_s'), 3)} | {_fmt(row['speedup'], 2, 'x')} "
            f"| {_per_round(row)} | {_fmt(gflop, 1)} | {_fmt(row['ideal_speedup'], 2, 'x')} "
            f"| {_fmt(row['efficiency'])} | {own_work} "
            f"| {'-' if operators is None else operators} "
            f"| {_fmt(None if memory is None else memory / 2**30, 2)} |"
        )
    if any(row.get("device", "").startswith("cpu") for row in rows):
        lines.append("\nOn the CPU, peak mem is the process's peak resident memory, weights included.")
    if any(row.get("device", "").startswith("cuda") for row in rows):
        lines.append("\nOn a GPU, peak mem is the most memory allocated in a timed call, weights included.")
    issued = [row for row in rows if row["error"] is None and row.get("host_step_s") and row.get("median_s")]
    if issued:
        shares = ", ".join(
            f"{row['arch']} {row['res']} {row['variant']} {row['ratio']:g}: "
            f"{100 * row['host_step_s'] / row['median_s']:.0f}%"
            for row in issued
        )
        lines.append(
            "\nOn a GPU, own work is timed with syncs around each of its functions (an upper bound), and in "
            "brackets without syncs: the host's time to issue it, its cost to a step bound by the host. The "
            "host's time to issue the whole step, as a share of the step's median (near 100%: host-bound): "
            f"{shares}."
        )
    if any((row.get("efficiency") or 0) > 1 for row in rows):
        lines.append(
            "\nAn efficiency above 1: the FLOP count sees matrix products only, while merging also shrinks "
            "the memory traffic of the attention scores and softmax, which falls faster than the FLOPs."
        )
    measured = [row["rounds"] for row in rows if row["error"] is None and row.get("rounds") is not None]
    if measured and min(measured) < 3:
        lines.append(
            f"\n{min(measured)} round(s) only: each median rests on so few steps that the IQR says nothing "
            "about the spread; use --rounds 5 or more for numbers to compare."
        )
    return "\n".join(lines)


def generation_table(rows: list[dict]) -> str:
    lines = [
        "| arch | res | variant | ratio | steps | median s/generation | IQR s | speedup |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['arch']} | {row['res']} | {row['variant']} | {row['ratio']:g} | {row['steps']} "
            f"| {row['median_s']:.3f} | {row['iqr_s']:.3f} | {row['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def _write(
    path: Path, markdown: Path, meta: dict[str, Any], rows: list[dict], generation_rows: list[dict]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "loadavg_now": list(os.getloadavg())}
    results = {"meta": meta, "rows": rows, "generation_rows": generation_rows}
    write_atomically(path, (json.dumps(results, indent=1) + "\n").encode())
    header = (
        f"Device: {meta['device_name']} ({meta['device']}), {meta['dtype']}, attention {meta['attention']}, "
        f"{meta['memory_format']} memory format, "
        f"{meta['rounds']} round(s), load average {meta['loadavg_start'][0]:.2f} at start and "
        f"{meta['loadavg_now'][0]:.2f} at the end.\n\n`{meta['command']}`\n\n"
    )
    text = header + markdown_table(rows) + "\n"
    if generation_rows:
        settings = f"denoising loop, CFG {GUIDANCE:g}, DeepCache interval {DEEPCACHE_INTERVAL}"
        text += f"\nWhole generations ({settings}):\n\n"
        text += generation_table(generation_rows) + "\n"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(markdown, text.encode())


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    markdown = args.markdown
    meta = _meta(settings, _command(args, settings))
    total_cases = sum(len(values) for values in settings.resolutions.values())

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    say(
        f"imptome bench speed: {total_cases} case(s) x {len(settings.variants)} variant(s) "
        f"on {meta['device_name']}"
    )
    rows: list[dict] = []
    generation_rows: list[dict] = []
    ratios = sorted({variant.ratio for variant in settings.variants if variant.name != "none"})
    for name in settings.archs:
        spec = ARCHS[name]
        say(f"[{name}] building the denoiser ({settings.dtype}, {settings.device})")
        model = build_denoiser(name, dtype=DTYPES[settings.dtype], device=settings.device)
        # Module.to takes memory_format, which torch's type stubs leave out
        model.to(memory_format=TORCH_MEMORY_FORMATS[settings.memory_format])  # type: ignore[call-overload]
        _set_attention(model, spec, settings.attention)
        for res in settings.resolutions[name]:
            records = _measure_case(model, spec, res, settings, say)
            rows += _rows(records, spec, res, settings, model)
            if settings.generation_steps and spec.model_kind == "sd":
                measured = measure_generations(
                    model,
                    _inputs(spec, res, settings),
                    res,
                    ratios,
                    settings.generation_steps,
                    settings.rounds,
                    say,
                    f"[{name} {res}px]",
                )
                generation_rows += [{**_case_fields(spec, res, settings), **row} for row in measured]
            _write(args.json, markdown, meta, rows, generation_rows)
        del model
        gc.collect()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    print(markdown_table(rows))
    if generation_rows:
        print("\n" + generation_table(generation_rows))
    note = busy_machine_note("rerun on an idle machine or with more --rounds")
    if note is not None:
        say(note)
    say(f"wrote {args.json} and {markdown}")
    return 0
