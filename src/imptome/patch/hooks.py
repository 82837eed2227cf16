"""Forward hooks: the denoiser hooks drive the step state; layer hooks merge inputs and unmerge outputs.

Nothing of diffusers' forward code is copied or replaced: attention processors (SDPA, xformers,
IP-Adapter, custom) keep running, on fewer query tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from imptome.config import MergeConfig
from imptome.merge.plan import MergePlan
from imptome.patch.families import BlockSite, processor_name
from imptome.patch.state import MaskDtype, PatchState

_SAMPLE_KEYS = ("sample", "hidden_states")


@dataclass(frozen=True)
class MergedLayer:
    """A sub-layer of a transformer block (attn1, attn2, ff; SD3: attn, attn2, ff) whose token input is
    merged."""

    name: str
    block_name: str
    block: nn.Module
    module: nn.Module
    self_attention: bool
    joint: bool  # SD3's attention over image and text tokens: its encoder_hidden_states is the text


def _first_input(args: tuple, kwargs: dict, keys: tuple[str, ...]) -> tuple[Any, str | int | None]:
    for key in keys:
        if key in kwargs:
            return kwargs[key], key
    return (args[0], 0) if args else (None, None)


def _timestep_position(denoiser: nn.Module) -> int:
    """Positional index of `timestep` in the denoiser's forward (e.g. 1 for UNets and DiT, 2 for PixArt).

    Read from the first class in the denoiser's MRO whose forward names `timestep`: tools such as DeepCache
    replace the instance's `forward`, and subclasses may define their own, with a (*args, **kwargs) wrapper
    that still passes the original arguments through. Classes without a forward (a mixin listed before the
    model's class) are passed over. Every supported family's forward names it.
    """
    forwards = (getattr(cls, "forward", None) for cls in type(denoiser).__mro__)
    parameters = (inspect.signature(forward).parameters for forward in forwards if forward is not None)
    names = next(list(names) for names in parameters if "timestep" in names)
    return names.index("timestep") - 1  # minus self


# Graphs Dynamo may keep per compiled function once a model is patched (see make_room_for_graphs).
RECOMPILE_LIMIT = 64


def make_room_for_graphs() -> None:
    """Raise Dynamo's per-function graph limit (`torch._dynamo.config.recompile_limit`, 8) to RECOMPILE_LIMIT
    unless the user set it. Called at every denoiser call, before any compiled block runs: Dynamo keeps its
    settings per thread (a context variable), and a pipeline patched in one thread may run in others (web
    servers run requests in worker threads). About 2 us.

    A patched model specialises its graphs on what the layer hooks read from the patch's state: the schedule's
    phase (warm-up or merging), the latent grid, the batch's rows and layout, and, compiled block by block,
    whether the block builds its grid's plan or reuses it. So every image size or batch size compiles graphs
    of its own (2 for a model compiled whole, 5 per transformer block's forward with
    `compile_repeated_blocks` on SD UNets), where the unpatched model turns dynamic after one change. With 8,
    a regionally compiled pipeline failed at its second image size (fullgraph=True: FailOnRecompileLimitHit
    from inside torch; otherwise the blocks fell back to eager mode) and a whole one at its fifth.
    """
    config = torch._dynamo.config
    is_default = getattr(config, "_is_default", lambda name: config.recompile_limit == 8)
    if is_default("recompile_limit") and config.recompile_limit < RECOMPILE_LIMIT:
        config.recompile_limit = RECOMPILE_LIMIT


class DenoiserHooks:
    """Start and end each denoiser call in the patch's state.

    Methods of an object holding the state, not closures: `copy.deepcopy` of a patched model then gives a
    copy whose every hook drives the copy's state (a closure is copied by reference, so the copy's denoiser
    hooks drove the original's state while its layer hooks read the copy's).

    The hooks hold host logic (timestep and batch checks) and run eagerly, once per call. Disabling Dynamo
    on the hook functions themselves, not only on what they call, keeps them out of any trace: a model
    compiled whole with `torch.compile(denoiser, fullgraph=True)` runs its hooks outside the compiled frame
    (Dynamo would otherwise trace the hook frame and stop at its first eager call).
    """

    def __init__(self, state: PatchState, timestep_position: int) -> None:
        self.state = state
        self.timestep_position = timestep_position

    @torch.compiler.disable
    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        make_room_for_graphs()
        sample, _ = _first_input(args, kwargs, _SAMPLE_KEYS)
        if "timestep" not in kwargs and len(args) <= self.timestep_position:
            return  # the denoiser's forward raises its own error for the missing argument
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[self.timestep_position]
        conditioning = tuple(
            value
            for value in (*args, *kwargs.values())
            if isinstance(value, torch.Tensor) and value is not sample and value is not timestep
        )
        self.state.begin_call(sample, timestep, conditioning)

    @torch.compiler.disable
    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        noise_pred = output[0] if isinstance(output, tuple) else output.sample
        self.state.end_call(noise_pred)

    def register(self, denoiser: nn.Module) -> list[RemovableHandle]:
        return [
            denoiser.register_forward_pre_hook(self.pre, with_kwargs=True),
            denoiser.register_forward_hook(self.post, with_kwargs=True),
        ]


class LayerHooks:
    """Merges the token input of one attention / MLP module and unmerges its output."""

    def __init__(self, state: PatchState, layer: MergedLayer, block_index: int) -> None:
        self.state = state
        self.block_name = layer.block_name
        self.block_index = block_index
        self.self_attention = layer.self_attention
        self.joint = layer.joint
        self.mask_dtype = MaskDtype(layer.module)
        if layer.self_attention:
            state.mask_dtypes.append(self.mask_dtype)
        # One entry per call of the module, its plan or None (not merged), popped by that call's unmerge: a
        # plan left by a call that never reached its unmerge (an exception inside the module) is never
        # applied to another call's output. The state empties the stack at each denoiser call's start.
        self.pending: list[MergePlan | None] = []
        state.unmerge_stacks.append(self.pending)

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.state.layers_ran = True
        tokens, where = _first_input(args, kwargs, ("hidden_states",))
        other_keys = self._other_keys(args, kwargs)
        plan = self._plan(module, tokens, other_keys, kwargs)
        self.pending.append(plan)
        if plan is None:
            return None
        # proportional attention: an additive mask over the kept tokens, which are the keys unless the call
        # brings its own (those are not merged, so each weighs one token: no mask is the exact attention)
        if self.self_attention and plan.key_bias is not None and not other_keys:
            check_mask_support(module, plan.num_kept)
            mask = plan.key_bias.float() if self.mask_dtype.float32 else plan.key_bias
            kwargs = {**kwargs, "attention_mask": mask}
        merged = plan.merge(tokens, self.state.merge_kernel)
        if where == 0:
            return (merged, *args[1:]), kwargs
        return args, {**kwargs, where: merged}

    def _other_keys(self, args: tuple, kwargs: dict) -> bool:
        """Whether this self-attention call attends to other keys than its tokens: `encoder_hidden_states`
        given to a self-attention other than SD3's joint one. Reference-only control (diffusers' community
        reference pipelines) replaces the blocks' forward to call attn1 with its tokens followed by a
        reference pass's, [B, N + M, C], and again on the unconditional rows alone over their own tokens.
        Only `hidden_states` is merged: the queries, not those keys."""
        if not self.self_attention or self.joint:
            return False
        return kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None) is not None

    def _plan(self, module: nn.Module, tokens: Any, other_keys: bool, kwargs: dict) -> MergePlan | None:
        """The plan to merge this call's tokens with, or None when they are not merged."""
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
            return None
        # A mask over the query tokens themselves would no longer line up once they are merged: a
        # self-attention mask, or IP-Adapter's regional masks (resized to the query count as a grid).
        if self.self_attention and kwargs.get("attention_mask") is not None:
            return None
        if kwargs.get("ip_adapter_masks") is not None and _uses_ip_adapter_masks(module):
            return None
        grid = self.state.token_grid(tokens.shape[1])
        if grid is not None and tokens.shape[0] != self.state.rows:
            if other_keys:  # e.g. reference-only control's unconditional rows: left unmerged, exact
                return None
            raise ValueError(
                f"imptome: {self.block_name} received {tokens.shape[0]} rows of tokens in a denoiser call "
                f"with {self.state.rows} (images x frames): the batch is split inside the model (e.g. "
                "AnimateDiff FreeNoise's enable_free_noise_split_inference), and imptome plans for the whole "
                "batch. Merge without split inference (FreeNoise itself works) or remove the patch."
            )
        return None if grid is None else self.state.plan_for(self.block_name, self.block_index, grid, tokens)

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        plan = self.pending.pop() if self.pending else None
        if plan is None:
            return None
        if isinstance(output, tuple):
            return (plan.unmerge(output[0]), *output[1:])
        return plan.unmerge(output)

    def register(self, module: nn.Module) -> list[RemovableHandle]:
        return [
            module.register_forward_pre_hook(self.pre, with_kwargs=True),
            module.register_forward_hook(self.post, with_kwargs=True),
        ]


def _uses_ip_adapter_masks(attention: nn.Module) -> bool:
    """IP-Adapter processors read `ip_adapter_masks`; the others ignore it (diffusers passes the same
    cross_attention_kwargs to every attention of a block)."""
    return "IPAdapter" in processor_name(attention)


def check_mask_support(attention: nn.Module, num_kept: int | None) -> None:
    """Refuse processors that cannot take proportional attention's additive mask, with the fix, rather than
    fail deep inside them: xformers' kernels want a key count that is a multiple of 8 (diffusers' xformers
    processors pass the mask unpadded, diffusers#9637), SD3's joint-attention processors ignore masks,
    perturbed-attention guidance's processors split the batch into its copies and reshape the mask for fewer
    rows than it has, and Text2Video-Zero's cross-frame processors attend to other frames' tokens than the
    mask's. Zero123++'s reference-only processors (`ReferenceOnlyAttnProc`, also in pipelines derived from
    it) append the reference pass's tokens to the keys, which the mask does not cover (diffusers pads a short
    mask by the whole key count, and SDPA failed on its length); those tokens are the reference pass's merged
    ones, and the copies of the processor differ in how they pass them, so imptome cannot extend the mask.
    Checked at patching (num_kept None: not known yet) and at every merged call, as the processors may change
    in between."""
    name = processor_name(attention)
    if num_kept is not None and num_kept % 8 and "XFormers" in name:
        raise ValueError(
            f"imptome: proportional_attention passes an additive attention mask over the {num_kept} kept "
            f"tokens, and {name} cannot take a mask whose length is not a multiple of 8. Use PyTorch's SDPA "
            "processor (pipe.disable_xformers_memory_efficient_attention()) or proportional_attention=False."
        )
    if "JointAttn" in name:  # SD3 processors: plain, IP-Adapter, PAG
        raise ValueError(
            f"imptome: proportional_attention passes an additive attention mask, and {name} (SD3's attention "
            "over text and image tokens) ignores attention masks, so it would have no effect. Use "
            "proportional_attention=False."
        )
    if name.startswith("CrossFrameAttnProcessor"):  # Text2Video-Zero
        raise ValueError(
            f"imptome: proportional_attention passes each frame an additive attention mask for its own kept "
            f"tokens, and {name} (Text2Video-Zero) makes every frame attend to the first frame's, which the "
            "mask does not describe. Use proportional_attention=False."
        )
    if name == "ReferenceOnlyAttnProc":
        raise ValueError(
            "imptome: proportional_attention passes an additive attention mask over the kept tokens, and "
            f"{name} (Zero123++'s reference-only attention) also attends to the reference image's tokens, "
            "which the mask does not cover. Use proportional_attention=False (merging works without it)."
        )
    if name.startswith("PAG"):
        raise ValueError(
            f"imptome: proportional_attention passes an additive attention mask, and {name} (perturbed-"
            "attention guidance) cannot take one on a layer imptome merges. Apply PAG to other layers "
            "(pag_applied_layers) or use proportional_attention=False."
        )


def merged_layers(blocks: list[BlockSite], config: MergeConfig) -> list[MergedLayer]:
    """The sub-layers whose token input the config merges, in module order."""
    layers = []
    for site in blocks:
        if site.in_transformer_denoiser and config.block_range is not None:
            first, stop = config.block_range
            if not first <= site.index < stop:
                continue
        block = site.block
        if site.joint:  # image tokens of the joint attention, and of SD3.5's image self-attention
            candidates = (
                ("attn", config.merge_attn, True),
                ("attn2", config.merge_attn, True),
                ("ff", config.merge_mlp, False),
            )
        else:
            candidates = (
                ("attn1", config.merge_attn, True),
                ("attn2", config.merge_crossattn, False),
                ("ff", config.merge_mlp, False),
            )
        for attribute, selected, self_attention in candidates:
            module = getattr(block, attribute, None)
            if selected and module is not None:
                # A block built with only_cross_attention (the SD 2 x4 upscaler's) has an attn1 over the text
                self_attention = self_attention and not getattr(module, "is_cross_attention", False)
                name = f"{site.name}.{attribute}"
                joint = site.joint and attribute == "attn"
                layers.append(MergedLayer(name, site.name, block, module, self_attention, joint))
    return layers


def register_hooks(
    denoiser: nn.Module, layers: list[MergedLayer], state: PatchState
) -> list[RemovableHandle]:
    """Hook the denoiser and each merged layer; returns the handles to remove."""
    handles = DenoiserHooks(state, _timestep_position(denoiser)).register(denoiser)
    # a block's position among the merged blocks keys its per-block draws (plan_scope="layer"), so merging
    # more or fewer of its sub-layers (merge_crossattn, merge_mlp) leaves every block's draws as they are
    block_position = {name: i for i, name in enumerate(dict.fromkeys(layer.block_name for layer in layers))}
    for layer in layers:
        handles += LayerHooks(state, layer, block_position[layer.block_name]).register(layer.module)
    return handles
