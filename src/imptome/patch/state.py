"""Per-denoiser state of a patch: the current generation's step, CFG layout, importance map and plans."""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from types import FrameType
from typing import TypeGuard

import torch
from torch import nn

from imptome.config import MergeConfig
from imptome.merge import (
    build_plan,
    cell_partition,
    guidance_importance,
    importance_partition,
    importance_pool,
    pool_size,
    pool_to_grid,
)
from imptome.merge.noise import random_bits, stream_id
from imptome.merge.plan import AveragingKernel, MergePlan
from imptome.patch.families import (
    DenoiserInfo,
    check_merged_layers,
    perturbed_attention_layout,
    scores_in_float32,
)
from imptome.patch.timestep import TimestepMemory, TimestepReader

# XORed into a plan's key for the random map of the "random" fallback: the top bit keeps its element indices
# (i ^ key) apart from those of the same key's cell draw, whose indices are far below 2**31.
_RANDOM_MAP_STREAM = stream_id(0x52414E44) | (1 << 31)
# Guided calls per step whose maps are kept apart by position (MultiDiffusion's crops: a 512 px high panorama
# has up to a few dozen); later calls of the step keep and use only the latest map, so that calls repeated
# at one timestep (a benchmark's loop) do not pile up maps.
_POSITIONS_KEPT = 256


_LIBRARIES = ("imptome", "diffusers", "torch")


def _outside_libraries() -> int:
    """The `stacklevel` at which `warnings.warn`, called by this function's caller, names the first frame
    outside imptome, diffusers and torch: the user's pipeline call, not a hook inside torch."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _LIBRARIES:
        frame, level = frame.f_back, level + 1
    return level


# Where diffusers defines StableDiffusionDiffEditPipeline: its own folder, later among the deprecated ones.
_DIFFEDIT_MODULES = tuple(
    f"diffusers.pipelines.{folder}stable_diffusion_diffedit.pipeline_stable_diffusion_diffedit"
    for folder in ("", "deprecated.")
)


def _called_by_diffedit_mask() -> bool:
    """Whether the denoiser call comes from `StableDiffusionDiffEditPipeline.generate_mask` (or a subclass's),
    read from the first frame outside imptome, torch and accelerate (whose offload hooks may wrap the call).
    That pass holds a copy of each noised latent per prompt, [source, negative, target, negative] in diffusers
    0.42 (without CFG [source, target], which fails there in diffusers itself), and its halves pass for a CFG
    batch of twice as many images. Every denoiser call asks, so the frames (several microseconds' walk) are
    read only once diffusers has imported the pipeline's module: before, no DiffEdit pipeline exists."""
    if not any(name in sys.modules for name in _DIFFEDIT_MODULES):
        return False
    frame: FrameType | None = sys._getframe(1)
    skipped = ("imptome", "torch", "accelerate")
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in skipped:
        frame = frame.f_back
    if frame is None or frame.f_code.co_name != "generate_mask":
        return False
    owner = type(frame.f_locals.get("self"))
    return any(cls.__name__ == "StableDiffusionDiffEditPipeline" for cls in owner.__mro__)


def _equal_chunks(latents: torch.Tensor, copies: int) -> bool:
    """Whether the batch of `latents` is `copies` equal chunks (waits for the GPU to compare them)."""
    if latents.shape[0] < copies or latents.shape[0] % copies:
        return False
    first, *others = latents.chunk(copies)
    return all(torch.equal(first, other) for other in others)


def _reusable(
    buffer: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype, device: torch.device
) -> TypeGuard[torch.Tensor]:
    """Whether `buffer` can be overwritten with a tensor of this shape, dtype and device (an inference tensor
    only inside `torch.inference_mode`).

    The patch keeps the tensors that its layer hooks read (the call's key, the importance map) at one address
    and overwrites them: under torch.compile the hooks reach them through the model's modules, so Dynamo
    treats them as static inputs, and CUDA graphs (mode="reduce-overhead") bake their addresses in and
    re-record the whole model whenever one moves (on an H100 that made a compiled merged SD2 step 2.6x slower
    than the compiled unmerged one).
    """
    return (
        buffer is not None
        and (buffer.shape, buffer.dtype, buffer.device) == (shape, dtype, device)
        and (torch.is_inference_mode_enabled() or not buffer.is_inference())
    )


def _ranking_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys [...] that order as the float32 `values` [...] do (equal values, equal keys): the bits of a
    float32 order as its value when it is >= 0, and negative ones in reverse, so their magnitude bits are
    flipped (-0.0 is made 0.0 first). A map mixes with 32-bit random draws this way without float64, which
    Apple GPUs lack."""
    bits = (values.float() + 0.0).view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()


@dataclass
class MaskDtype:
    """Whether a merged self-attention gets proportional attention's mask in float32 (it adds the mask to
    float32 scores, see `families.scores_in_float32`). Set at each generation's start, outside any trace, and
    read by the layer's hook: a bool that is the same for every layer of a model, so a model compiled block by
    block is not recompiled per layer, and its processor is not inspected inside the trace."""

    attention: nn.Module
    float32: bool = False


@dataclass
class PlanRecord:
    """A plan used in the last denoiser call, with what it was built from (see `imptome.merge_plan`).

    Attributes:
        grid: (h, w) token grid.
        layer: name of the block whose tokens built the plan (with plan_scope="step" it is reused by every
            merged layer of this grid).
        importance: [U, h, w] the pooled CFG importance map of the call, or None (no CFG map: method
            "tome", a warm-up step, or a call without CFG, which with fallback "random" ranks by a random
            map). An image whose map is zero is planned from a random map in its place.
        roles: [B, h, w] per denoiser row: 0 merged, 1 destination, 2 independent.
        source: [B, h * w] index of the kept token whose attention output each token receives.
        pruned: True when removed tokens were dropped rather than averaged (warm-up).
    """

    grid: tuple[int, int]
    layer: str
    importance: torch.Tensor | None
    roles: torch.Tensor
    source: torch.Tensor
    pruned: bool


@dataclass
class _Built:
    plan: MergePlan
    block: str
    importance: torch.Tensor | None

    def clone(self) -> _Built:
        importance = None if self.importance is None else self.importance.clone()
        return _Built(self.plan.clone(), self.block, importance)


@dataclass
class PatchState:
    """Everything a patch remembers between hooks. One per patched denoiser."""

    config: MergeConfig
    info: DenoiserInfo
    cond_first: bool
    max_downsample: int
    merge_kernel: AveragingKernel  # config.merge_kernel as resolved by apply_patch
    step: int = 0
    last_timestep: float | None = None
    latent_grid: tuple[int, int] | None = None
    rows: int = 0  # token rows every merged layer sees this call: batch, times frames for video
    # The batch is `copies` equal chunks of U images that share one plan per image: 2 for CFG [uncond, cond]
    # (DiT: [cond, uncond]), 3 for PAG with CFG [uncond, cond, perturbed] and for InstructPix2Pix
    # [instruction + image, image only, neither] (cond_copy 0, uncond_copy 2). Matching reads chunk
    # `cond_copy`; the map is |chunk cond_copy - chunk uncond_copy| (None: the batch has no unconditional
    # chunk).
    copies: int = 1
    cond_copy: int = 0
    uncond_copy: int | None = None
    # The layout (copies, cond_copy, uncond_copy) found for each input shape this generation, and whether two
    # calls in a row found it (then it is kept without comparing again; see _detect_copies).
    layouts: dict[torch.Size, tuple[tuple[int, int, int | None], bool]] = field(default_factory=dict)
    read_timestep: TimestepReader = field(default_factory=TimestepReader)
    compare_timestep_memory: TimestepMemory = field(default_factory=TimestepMemory)
    perturbed_attention: str | None = None  # PAG's layout this generation: perturbed_attention_layout
    attention_modules: list[nn.Module] = field(default_factory=list)  # every attention of the denoiser
    # Importance maps [U, H, W] (float32) made by guided calls of the step before and of this step, by the
    # position within its step of the call that made it (a split-CFG pair's: its first pass), and the latest
    # map of the generation. A call merges with the map of the call at its position in the step before, else
    # with the latest: pipelines that call the denoiser once per crop of one image at every timestep
    # (MultiDiffusion) rank each crop's tokens by that crop's own map.
    maps_before: dict[int, torch.Tensor] = field(default_factory=dict)
    maps_now: dict[int, torch.Tensor] = field(default_factory=dict)
    latest_map: torch.Tensor | None = None
    position: int = 0  # this call's position among its step's calls
    call_map_buffer: torch.Tensor | None = None  # the map this call merges with, at one address (_reusable)
    has_call_map: bool = False
    calls: int = 0
    call_key: torch.Tensor | None = None
    use_importance: bool = False
    average: bool = False
    plans: dict[object, _Built] = field(default_factory=dict)
    last_plans: list[_Built] = field(default_factory=list)
    # Split CFG (diffusers' guiders, modular pipelines): the conditional and unconditional passes are two
    # calls with the same sample at the same timestep. The second call of such a pair reuses the first's
    # plans, and the pair's two outputs make the map.
    guided: bool = False  # this call merges with the importance map (a CFG batch, split CFG, or a pass after
    # a CFG batch at the same timestep, e.g. SD3's skip-layer guidance)
    paired: bool = False  # this call is the second pass of a split-CFG pair
    pair_step: int | None = None  # the step whose pair made the current map
    # a call of the pair's step had another sample than the pair's: a second pair may follow (second-order
    # schedulers such as Heun evaluate each timestep twice, at two samples)
    sample_moved_since_pair: bool = False
    inverting: bool = False  # the generation is an inversion: its timesteps went up through one schedule
    cfg_step: int | None = None  # the step whose CFG batch made the current map
    last_sample: torch.Tensor | None = None  # input and output of the last call without a CFG batch
    last_sample_version: int | None = None  # last_sample's version counter then (None: an inference tensor)
    # the last call's other tensor arguments (text embeddings, class labels), weakly: a call given the very
    # same ones on the same sample repeats that call, it is no second pass of split CFG
    last_conditioning: tuple[weakref.ref, ...] = ()
    last_output: torch.Tensor | None = None
    last_shape: torch.Size | None = None  # input shape of the last call
    warned_no_cfg: bool = False
    # Generations in a row that stopped after their first call while their schedules held more timesteps:
    # generations taking turns on this denoiser look like that (see begin_call).
    stopped_early_in_a_row: int = 0
    warned_turns: bool = False
    # Per image, whether the first map of the generation was zero everywhere: the conditional and
    # unconditional predictions were equal (e.g. the prompt is the negative prompt), so the map ranks nothing
    # and a random map stands in for it (see _ranking_map). None until that map is checked (end_call), once
    # per generation.
    silent_units: tuple[bool, ...] | None = None
    warned_silent_map: bool = False
    warned_unfit_map: bool = False  # a guided call whose batch did not match its map (see begin_call)
    layers_ran: bool = False  # set by every layer hook; checked after the first call (see end_call)
    merged_modules: dict[str, nn.Module] = field(default_factory=dict)  # name -> module of each merged layer
    feed_forward_blocks: dict[str, nn.Module] = field(default_factory=dict)  # block name -> block, ff merged
    checked_layers: bool = False
    mask_dtypes: list[MaskDtype] = field(default_factory=list)  # one per merged self-attention
    # Each layer hook's stack of the plans its calls merged with, popped at their unmerge. A call stopped by
    # an exception inside a merged layer leaves its plan there; begin_call empties the stacks.
    unmerge_stacks: list[list[MergePlan | None]] = field(default_factory=list)
    call_open: bool = False  # from begin_call to end_call; still set at a begin_call: the last call raised

    @property
    def importance(self) -> torch.Tensor | None:
        """The latest importance map [U, H, W] (float32) a guided call made this generation, or None."""
        return self.latest_map

    @importance.setter
    def importance(self, value: torch.Tensor) -> None:
        """Replace the map the last call made (or give it one): the map later calls merge with."""
        self._keep_map(value.detach().clone())

    def _keep_map(self, values: torch.Tensor) -> None:
        """Keep `values` as the map made by this call (by the pair, in a split-CFG pair's second pass)."""
        made_by = self.position - 1 if self.paired else self.position
        if made_by < _POSITIONS_KEPT:
            self.maps_now[made_by] = values
        self.latest_map = values

    @property
    def call_map(self) -> torch.Tensor | None:
        """The importance map [U, H, W] this call's guided plans are built from, or None."""
        return self.call_map_buffer if self.has_call_map else None

    def _select_call_map(self) -> None:
        """Put the map of the call at this call's position in the step before, else the latest map, into the
        call's map buffer, overwriting it in place."""
        chosen = self.maps_before.get(self.position, self.latest_map)
        self.has_call_map = chosen is not None
        if chosen is not None:
            if _reusable(self.call_map_buffer, chosen.shape, chosen.dtype, chosen.device):
                self.call_map_buffer.copy_(chosen)
            else:
                self.call_map_buffer = chosen.clone()

    @property
    def ranks_by_map(self) -> bool:
        """Whether an importance map ranks this patch's tokens (method "importance", ratio > 0): only then do
        a zero map or a generation that never reaches importance merging matter (tome has neither)."""
        return self.config.method == "importance" and self.config.ratio > 0

    @property
    def cfg(self) -> bool:
        """Whether this call's batch holds a conditional and an unconditional copy of every image."""
        return self.uncond_copy is not None

    # ---- called by the denoiser hooks -------------------------------------------------------------
    # begin_call and end_call hold the host-side logic (timestep and CFG checks, the schedule). Under
    # torch.compile they run eagerly, once per denoiser call, outside the graph. What the traced layer hooks
    # read changes rarely: Dynamo guards on the phase flags (use_importance, average: at most two changes
    # per generation), the batch layout (copies, cond_copy, guided) and the grid, never on the step
    # counter; the key of the call's random draws is a device tensor overwritten in place.
    @torch.compiler.disable
    def begin_call(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        conditioning: tuple[torch.Tensor, ...] = (),
    ) -> None:
        """Start of a denoiser call: detect a new generation or step, the latent grid and whether CFG is on.
        `conditioning`: the call's tensor arguments besides the sample and timestep.

        A new generation starts when the timestep goes up (unless the calls walk on through one schedule: an
        inversion's next step, after which a call outside that schedule starts a new generation), when the
        walk through a schedule turns back (the schedule run again), when it lives in other memory than the
        last call's scheduler timesteps (an interrupted generation followed by image-to-image, which starts
        lower) or is part of a schedule after a call with a number,
        or when a call at the first timestep of a generation repeats and is no split-CFG pair nor a further
        pass on the pair's sample, with the same input shape or a timestep in other memory: one-step
        generations run back to back, whose plans must not depend on how many ran before (the very timestep
        of a schedule of several is no such repeat).
        Other calls at the same timestep belong to one step (e.g. Zero123++'s reference-image pass before the
        main pass, the two passes of split CFG, SD3's skip-layer-guidance pass after the CFG batch, or
        MultiDiffusion's crops). A guided call merges with the map made by the call at its position in the
        step before, else with the latest map. A call without CFG merges with the map of its step's CFG batch
        or split-CFG pair when one came before it, else as `config.fallback` says; it neither produces nor
        clears the map, so a later guided call of the generation can use it.
        """
        for stack in self.unmerge_stacks:
            stack.clear()
        if self.call_open:  # the last call raised before its end: this one is not the second pass of its pair
            self.last_sample = self.last_output = None
        self.call_open = True
        t = self.read_timestep(timestep)
        # the last generation made one call, whose schedule held later timesteps (read before it is replaced)
        stopped_early = self.step == 0 and self.calls == 0 and self.compare_timestep_memory.more_to_come
        same_memory, new_schedule = self.compare_timestep_memory(timestep, t)
        same_timestep = t == self.last_timestep
        # the passes of a split-CFG pair get one timestep tensor: a timestep in other memory starts another
        # one-step generation (with a one-element schedule, which `new_schedule` cannot tell)
        self.paired = same_timestep and self._pairs_with_last_call(
            sample, conditioning, same_memory is not False
        )
        # the very timestep of a schedule of several is another call of the step, not a one-step generation
        # (MultiDiffusion's next crop)
        step_of_a_schedule = same_memory is True and self.compare_timestep_memory.in_schedule
        # a further pass on the sample of this step's split-CFG pair (PAG or skip-layer guidance with guiders)
        pass_after_pair = (
            same_memory is not False and self.pair_step == self.step and not self.sample_moved_since_pair
        )
        repeated_start = (
            same_timestep
            and self.step == 0
            and not self.paired
            and not step_of_a_schedule
            and not pass_after_pair
            and (self.last_shape == sample.shape or same_memory is False)
        )
        self.last_shape = sample.shape
        went_up = self.last_timestep is None or t > self.last_timestep
        # An inversion's next step (DDIM inversion, DiffEdit's invert): its timesteps go up as the calls walk
        # on through one schedule. A walk that turns back begins again: a new generation. An inversion ends
        # with its walk: a call in other memory, or with a number, starts a new generation.
        memory = self.compare_timestep_memory
        inversion_step = went_up and memory.moved_on
        left_inversion = self.inverting and same_memory is not True
        new_generation = (
            (went_up and not inversion_step)
            or memory.walked_back
            or left_inversion
            or repeated_start
            or new_schedule
        )
        if new_generation:
            self.start_generation()  # forgets the last call's sample and output: no pair across generations
            self.paired = False
            self._count_stopped_early(stopped_early and self.last_timestep is not None)
        elif (self.last_timestep is not None and t < self.last_timestep) or inversion_step:  # None: went up
            self.inverting = inversion_step
            self.step += 1
            self.maps_before, self.maps_now = self.maps_now, {}
            self.stopped_early_in_a_row = 0
        self.position = 0 if new_generation or t != self.last_timestep else self.position + 1
        self.last_timestep = t
        diffedit_mask = _called_by_diffedit_mask()
        if diffedit_mask:  # no unconditional copy: merged as a call without CFG, without warning
            self._diffedit_mask_copies(sample)
        else:
            self._detect_copies(sample)  # with this generation's PAG layout
        self.last_sample = sample if self.copies == 1 else None
        self.last_sample_version = None if sample.is_inference() else sample._version
        self.last_conditioning = tuple(weakref.ref(tensor) for tensor in conditioning)
        self.guided = (
            self.cfg
            or self.cfg_step == self.step
            or (self.pair_step is not None and self.step - self.pair_step <= 1)
        )
        patch = self.info.patch_size
        self.latent_grid = (sample.shape[-2] // patch, sample.shape[-1] // patch)
        self.rows = sample.shape[0] * self.info.frames(sample)
        self.enter_step(self.step)
        if self.use_importance and self.guided and not self.paired:  # a pair's passes share one map
            self._select_call_map()
        if self.paired:  # the second pass of a pair keeps the first pass's draws and plans
            # Copies of the first pass's plans and output: under CUDA graphs they are graph memory that this
            # call's replay overwrites (torch.compile(mode="reduce-overhead") starts a new generation of its
            # graphs at every call in inference), and the plans are read and the map made after it.
            self.plans = {key: built.clone() for key, built in self.plans.items()}
            assert self.last_output is not None  # set: the first pass ended (else call_open)
            self.last_output = self.last_output.clone()
        else:
            self.calls = 0 if new_generation else self.calls + 1
            self._set_call_key(sample.device)
            self.plans = {}
        merges = self.config.ratio > 0  # ratio 0 merges nothing, so there is nothing to warn about
        if merges and self.use_importance and not (self.guided or diffedit_mask or self.warned_no_cfg):
            warnings.warn(
                "imptome: this denoiser call has no classifier-free guidance (guidance_scale <= 1, a CFG "
                "cut-off, a distilled model, or an auxiliary pass such as Zero123++'s reference image); "
                "such calls merge without importance: "
                + (
                    "a random map stands in for it (fallback: random)."
                    if self.config.fallback_partition == "random"
                    else f"ToMeSD's random {self.config.sx}x{self.config.sy}-cell partition (fallback: tome)."
                ),
                stacklevel=_outside_libraries(),
            )
            self.warned_no_cfg = True
        # a call without a CFG batch that merges with the map of its step's (a further pass) but does not fit
        # it; a CFG batch that does not fit the map of the step before (the batch changed) makes its own
        units = self.rows // self.copies
        call_map = self.call_map
        unfit = self.guided and not self.cfg and call_map is not None and not self._map_fits(units)
        if call_map is not None and merges and self.use_importance and unfit and not self.warned_unfit_map:
            warnings.warn(
                f"imptome: this denoiser call has no CFG batch and follows one in its step, but its batch "
                f"({units} image(s)) does not match that call's importance map ({call_map.shape[0]} "
                "image(s) on its grid), so it merges as a call without guidance does (see `fallback`). "
                "Pipelines that change their batch between the passes of a step (e.g. Pix2Pix-Zero) do this.",
                stacklevel=_outside_libraries(),
            )
            self.warned_unfit_map = True

    def _count_stopped_early(self, stopped_early: bool) -> None:
        """Warn once when three generations in a row stopped after one call although their schedules went on:
        generations that take turns on one denoiser (each call with its own scheduler's timestep) are each
        taken for a new generation at every call, so every call is a first step and none merges by
        importance."""
        self.stopped_early_in_a_row = self.stopped_early_in_a_row + 1 if stopped_early else 0
        if self.stopped_early_in_a_row >= 3 and self.ranks_by_map and not self.warned_turns:
            warnings.warn(
                "imptome: the last generations on this denoiser each stopped after one step although their "
                "schedules had more. If generations take turns on it (interleaved requests, or a generation "
                "run inside another's step callback), imptome takes every call for a generation's first step "
                "(random cells, pruned), and none merges by importance. Run them one after another, in one "
                "batch, or on separate copies of the denoiser (copy.deepcopy, then apply_patch).",
                stacklevel=_outside_libraries(),
            )
            self.warned_turns = True

    def start_generation(self) -> None:
        """Forget the last generation (step, maps, plans, batch layouts) and read again what may have changed
        on the model since patching: caches and chunking on merged layers (refused), attention processors
        (the dtype of proportional attention's mask) and PAG's layout."""
        check_merged_layers(self.merged_modules, self.feed_forward_blocks)
        for mask_dtype in self.mask_dtypes:
            mask_dtype.float32 = scores_in_float32(mask_dtype.attention)
        self.step = 0
        self.maps_before, self.maps_now, self.latest_map = {}, {}, None
        self.last_plans = []
        self.pair_step = self.cfg_step = self.last_sample = self.last_output = None
        self.silent_units = None
        self.sample_moved_since_pair = False
        self.perturbed_attention = perturbed_attention_layout(self.attention_modules)
        self.layouts = {}
        self.inverting = False

    def _pairs_with_last_call(
        self, sample: torch.Tensor, conditioning: tuple[torch.Tensor, ...], same_timestep_memory: bool
    ) -> bool:
        """Whether this call, at the last call's timestep, is the second pass of split CFG: the same sample
        and timestep memory as the last call, which had no copies in its batch (`last_sample` is kept only
        then, so this one has none either), other conditioning tensors (given the very same ones, the call
        repeats the last one, as Attend-and-Excite's refinement pass repeats its pass of the prompt alone),
        and no pair yet in this step at this sample (a third pass, e.g. PAG's, merges with the pair's map but
        makes none; Heun's second evaluation of the timestep, at another sample, is a pair again). The same
        tensor object is decided without comparing values, which would wait for the GPU: it is the same
        sample unless its version counter shows a write since the last call (an inference tensor has none,
        and is taken for the same sample)."""
        previous = self.last_sample
        if previous is None:
            return False
        if not same_timestep_memory:
            same = False
        elif previous is sample:
            same = self.last_sample_version is None or sample._version == self.last_sample_version
        else:
            same_kind = (previous.shape, previous.device) == (sample.shape, sample.device)
            same = same_kind and torch.equal(previous, sample)
        if self.pair_step == self.step and not self.sample_moved_since_pair:
            self.sample_moved_since_pair = not same
            return False
        # with no tensor arguments to tell by (conditioning only in dicts, say), the calls pair as before
        last = self.last_conditioning
        repeated = (
            bool(conditioning)
            and len(last) == len(conditioning)
            and all(ref() is tensor for ref, tensor in zip(last, conditioning, strict=True))
        )
        return same and not repeated

    def _detect_copies(self, sample: torch.Tensor) -> None:
        """Set copies / cond_copy / uncond_copy from the batch: chunks with equal noisy latents are copies of
        one image (their conditioning channels may differ: Stable Video Diffusion's unconditional copy has
        zeros for the image latents).

        Comparing the chunks waits for the GPU, which keeps the host from queueing the next call early (under
        CUDA graphs on an H100, 0.6.3's waits in every call, this one and reading the timestep, cost SD2 at
        1024 px about 1 ms a step). So the chunks are compared only until two calls in a row of the same
        input shape find the same layout, normally the generation's first two; that layout is then kept for
        the rest of the generation. A CFG batch repeats every image in every call, and images without CFG that
        start from equal noise part after their first step, once their different conditioning has acted (with
        equal conditioning they stay equal, and comparing would keep finding copies too). A new batch shape
        (a CFG cut-off, another pass) is compared anew."""
        known = self.layouts.get(sample.shape)
        if known is not None and known[1]:
            self.copies, self.cond_copy, self.uncond_copy = known[0]
            return
        layout = self._compare_chunks(sample)
        self.layouts[sample.shape] = (layout, known is not None and known[0] == layout)
        self.copies, self.cond_copy, self.uncond_copy = layout

    def _diffedit_mask_copies(self, sample: torch.Tensor) -> None:
        """Set the layout of DiffEdit's mask pass (see `_called_by_diffedit_mask`): the prompts' copies of
        each noised latent share one plan, matched on the target prompt's copy as when the pass was read as
        a CFG batch, and no copy is unconditional, so the pass makes no map."""
        latents = self.info.latents(sample)
        self.copies = next(copies for copies in (4, 2, 1) if _equal_chunks(latents, copies))
        self.cond_copy, self.uncond_copy = self.copies // 2, None

    def _compare_chunks(self, sample: torch.Tensor) -> tuple[int, int, int | None]:
        latents = self.info.latents(sample)
        if self.perturbed_attention == "cfg":  # [uncond, cond, perturbed]
            return (3, 1, 0) if _equal_chunks(latents, 3) else (1, 0, None)
        if self.perturbed_attention is None and self._instruct_pix2pix_batch(sample, latents):
            return 3, 0, 2  # the map is |instruction + image - neither|
        if _equal_chunks(latents, 2):
            if self.perturbed_attention == "plain":  # [cond, perturbed]: no unconditional copy
                return 2, 0, None
            cond_copy = 0 if self.cond_first else 1
            return 2, cond_copy, 1 - cond_copy
        return 1, 0, None

    def _instruct_pix2pix_batch(self, sample: torch.Tensor, latents: torch.Tensor) -> bool:
        """Whether the batch is InstructPix2Pix's (SD and SDXL): three copies of every image's noisy latents,
        [instruction + image, image only, neither], with the input image's latents concatenated as channels
        in the first two copies and zeros in the third. Other three-copy batches (safe latent diffusion,
        SEGA, equal-seed batches of three prompts) have no such channels; checked before two copies, which
        an InstructPix2Pix batch of two images with equal noise would also pass."""
        conditioning = self.info.conditioning(sample)
        if conditioning.numel() == 0 or not _equal_chunks(latents, 3):
            return False
        first, second, third = conditioning.chunk(3)
        return torch.equal(first, second) and not third.any()

    def enter_step(self, step: int) -> None:
        """Set the schedule's phase flags for `step` (the benchmarks use it to start mid-generation)."""
        config = self.config
        self.step = step
        self.use_importance = config.method == "importance" and step >= config.importance_start_step
        self.average = config.method == "tome" or step >= config.merge_start_step

    def _set_call_key(self, device: torch.device) -> None:
        """Key this call's draws by (seed, call within the generation): a fill, no host-to-device copy."""
        if not _reusable(self.call_key, torch.Size(), torch.int64, device):
            self.call_key = torch.empty((), dtype=torch.int64, device=device)
        self.call_key.fill_(stream_id(self.config.seed, self.calls))

    @torch.compiler.disable
    def end_call(self, noise_pred: torch.Tensor) -> None:
        """End of a denoiser call: keep this step's importance map for the next step."""
        if not self.checked_layers:
            self.checked_layers = True
            if not self.layers_ran:
                raise RuntimeError(
                    "imptome: none of the patched layers ran in this denoiser call, so nothing was merged. "
                    "If the model is compiled, a graph traced for an unpatched model of the same class is "
                    "being reused (torch.compile does not guard on module hooks): patch before compiling, "
                    "do not compile patched and unpatched copies of one model class in one process, or "
                    "call torch._dynamo.reset() after patching."
                )
        noise_pred = noise_pred.detach().movedim(self.info.channel_dim, 1)  # [B, C, ...] for the map
        channels = self.info.noise_channels
        made = None  # the map this call makes: its CFG batch's, or the split-CFG pair's that it ends
        if self.uncond_copy is not None:  # a CFG batch (self.cfg)
            chunks = noise_pred.chunk(self.copies)
            made = guidance_importance(chunks[self.cond_copy], chunks[self.uncond_copy], channels)
            self.cfg_step = self.step
        elif self.paired:  # |first pass - second pass|: the same magnitude whichever pass was conditional
            assert self.last_output is not None  # the first pass's, kept by begin_call
            made = guidance_importance(self.last_output, noise_pred, channels)
            self.pair_step = self.step
            self.sample_moved_since_pair = False
        if made is not None:
            self._keep_map(made)
            if self.silent_units is None and self.ranks_by_map:
                self._check_map_signal(made)
        self.last_output = noise_pred if self.copies == 1 else None
        self.last_plans = list(self.plans.values())
        self.call_open = False

    def _check_map_signal(self, importance: torch.Tensor) -> None:
        """Find the images whose map [U, H, W] is zero everywhere, once per generation and only where the map
        ranks tokens (it waits for the GPU, as the first calls' CFG checks do), and warn once when there are
        any."""
        self.silent_units = tuple((importance.flatten(1).amax(dim=1) <= 0).tolist())
        silent = sum(self.silent_units)
        if silent and not self.warned_silent_map:
            warnings.warn(
                f"imptome: for {silent} of {len(self.silent_units)} image(s) the conditional and "
                "unconditional predictions are equal (is the prompt the negative prompt?), so their CFG "
                "importance map is zero and ranks no token; those images merge with a random map in its "
                "place this generation.",
                stacklevel=_outside_libraries(),
            )
            self.warned_silent_map = True

    # ---- called by the layer hooks ----------------------------------------------------------------
    def token_grid(self, num_tokens: int) -> tuple[int, int] | None:
        """The merged grid with `num_tokens` tokens, or None when that layer is not to be merged."""
        if self.latent_grid is None:
            return None
        height, width = self.latent_grid
        factor = 1
        while factor <= self.max_downsample:
            grid = (math.ceil(height / factor), math.ceil(width / factor))
            if grid[0] * grid[1] == num_tokens:
                return grid
            factor *= 2
        return None

    def plan_for(
        self, block: str, block_index: int, grid: tuple[int, int], tokens: torch.Tensor
    ) -> MergePlan | None:
        """The plan for a layer's tokens [B, N, C]: reused per grid (plan_scope="step") or per block.

        `block_index` (the block's position among the merged blocks) keys per-block random draws."""
        per_step = self.config.plan_scope == "step"
        key = grid if per_step else (block, grid)
        built = self.plans.get(key)
        if built is None:
            stream = stream_id(*grid) if per_step else stream_id(block_index)
            # plans are indices: no graph to record when training (gradient checkpointing's recomputation
            # finds the plan built and must save the same tensors as the first forward did)
            with torch.no_grad():
                built = self._build(block, grid, tokens, stream)
            if built is None:
                return None
            self.plans[key] = built
        return built.plan

    def _map_fits(self, units: int) -> bool:
        """Whether the call's map belongs to this call: same units and latent grid (not, e.g., the map of the
        main pass during Zero123++'s reference pass on another grid)."""
        call_map = self.call_map
        if call_map is None or call_map.shape[0] != units:
            return False
        patch = self.info.patch_size
        return tuple(side // patch for side in call_map.shape[-2:]) == self.latent_grid

    def _ranking_map(
        self, grid: tuple[int, int], units: int, draw_key: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The map [U, N] that ranks a plan's tokens on `grid`, and the pooled CFG map to record (or None).

        The CFG map pooled to the grid on guided calls; a random map in place of it for images whose map is
        zero (see `silent_units`) and, with `fallback_partition="random"`, on calls without a map. (None,
        None): no ranking (method "tome", a warm-up step, or ToMeSD's partition as the fallback).
        """
        if not self.use_importance:
            return None, None
        num_tokens = grid[0] * grid[1]
        call_map = self.call_map if self.guided and self._map_fits(units) else None  # None: not guided
        guided = call_map is not None
        silent = self.silent_units if guided and self.silent_units and len(self.silent_units) == units else ()
        if call_map is not None and not (silent and all(silent)):  # with no image's map left, as without CFG
            cfg_map = pool_to_grid(call_map, grid)
            if not any(silent):
                return cfg_map, cfg_map
            # the images whose map is zero rank tokens by the random map (its 32-bit draws, as alone in their
            # batch), the others by theirs, both as int64
            random = random_bits(draw_key ^ _RANDOM_MAP_STREAM, (units, num_tokens))
            mask = torch.tensor(silent, device=cfg_map.device).unsqueeze(1)
            return torch.where(mask, random, _ranking_keys(cfg_map)), cfg_map
        if self.config.fallback_partition == "random" or silent:
            return random_bits(draw_key ^ _RANDOM_MAP_STREAM, (units, num_tokens)), None
        return None, None

    def _build(self, block: str, grid: tuple[int, int], tokens: torch.Tensor, stream: int) -> _Built | None:
        config = self.config
        rows, num_tokens = tokens.shape[:2]
        num_remove = math.floor(num_tokens * config.ratio)
        units = rows // self.copies
        if num_remove == 0 or units == 0:
            return None
        features = tokens  # matched on: the conditional copy, unless each row is matched alone
        per_row = self.copies > 1 and config.match_rows == "each" and config.matching == "feature"
        if self.copies > 1 and not per_row:
            features = tokens[self.cond_copy * units : (self.cond_copy + 1) * units]
        # [] int64: this call's draws for this grid or block (moved only when a model spans devices)
        assert self.call_key is not None  # set by begin_call
        draw_key = (self.call_key ^ stream).to(tokens.device)
        importance, record = self._ranking_map(grid, units, draw_key)
        in_pool = None
        if importance is not None:
            num_pool = pool_size(num_tokens, num_remove, config.pool_factor)
        if importance is not None and config.dst_selection != "cells":  # destinations from the pool
            num_dst = math.floor(num_tokens * config.dst_fraction)
            dst_idx, in_pool = importance_partition(
                importance, num_dst, num_pool, draw_key, topk_dst=config.dst_selection == "topk"
            )
        else:  # ToMeSD's cells, with or without the importance pool
            dst_idx = cell_partition(units, grid, config.sy, config.sx, draw_key)
            if importance is not None:
                in_pool = importance_pool(importance, num_pool)
        if dst_idx.shape[1] == 0:  # a grid smaller than one cell, or N * dst_fraction < 1: no destination
            return None
        if per_row:  # one partition and pool per image, repeated for each copy of it
            dst_idx = dst_idx.repeat(self.copies, 1)
            in_pool = None if in_pool is None else in_pool.repeat(self.copies, 1)
        metric = None
        if config.matching == "feature":
            metric = features.float() if features.device.type == "cpu" else features
        plan = build_plan(
            dst_idx,
            num_remove,
            grid,
            rows,
            metric=metric,
            in_pool=in_pool,
            average=self.average,
            chunk_entries=config.similarity_chunk,
            proportional=config.proportional_attention,
            bias_dtype=tokens.dtype,
        )
        if record is not None:
            # at the map's own grid a view of the map, which the next guided call overwrites
            record = record.view(units, *grid)
            assert self.call_map is not None  # the map `record` was pooled from
            record = record.clone() if record.shape == self.call_map.shape else record
        return _Built(plan, block, record)

    def records(self) -> list[PlanRecord]:
        """The last call's plans, expanded to one entry per denoiser row. New tensors: under CUDA graphs the
        plans are the graph's outputs, which its next replay overwrites."""
        out = []
        for built in self.last_plans:
            plan = built.plan
            rows = plan.rows
            roles = plan.roles.repeat(rows // plan.roles.shape[0], 1).view(rows, *plan.grid)
            source = plan.source()
            importance = None if built.importance is None else built.importance.clone()
            out.append(PlanRecord(plan.grid, built.block, importance, roles, source, plan.pruned))
        return out
