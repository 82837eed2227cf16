"""Train the miniature text-to-image model on procedural data (CPU: 83 minutes on 2 shared cores, see README).

Stages: (1) the VAE on random 32 px crops of generated images, (2) cache VAE posterior means of a fixed
training set and set the VAE scaling factor to 1/std of those latents, (3) text encoder + UNet with 10%
caption dropout, v-prediction with the plain (unweighted) v-loss and an EMA copy, (4) export the EMA weights
as a StableDiffusionPipeline folder.

    python -m imptome.miniature.train --out runs/miniature --export runs/miniature_model

Every stage checkpoints (safetensors + json) under --out and a rerun resumes where it stopped. The defaults
are fixed step counts, so a run is reproducible (seeded; float sums may differ with the thread count);
optional wall-time budgets (--vae-minutes, --unet-minutes) shorten training on a busy machine instead.

The loss matters for positions: with min-SNR-5 weights (--min-snr-gamma 5) the high-noise steps, where the
layout is decided, get almost no weight, and two such runs of 5600 and 8500 steps drew objects at random
cells. The plain v-loss learns positions within about 1500 steps. The shipped weights are this script's
output with its defaults (model_card.json, training).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import build, data

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel


def _log(out: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(out / "train_log.txt", "a") as f:
        f.write(line + "\n")


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float [n, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr_at(step: int, progress: float, base: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% as `progress` goes 0 -> 1."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _progress(step: int, total: int, elapsed: float, budget_min: float) -> float:
    """Fraction of the stage done: by steps, or by wall time when a time budget is set (whichever is ahead).

    With a budget the number of steps depends on machine load, so runs are seeded but not bit-reproducible;
    pass a budget of 0 for a fixed-step run.
    """
    p = step / total
    if budget_min > 0:
        p = max(p, elapsed / (60 * budget_min))
    return p


def _optim_state_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state_dict = opt.state_dict()
    tensors = {}
    for param_id, param_state in state_dict["state"].items():
        for k, v in param_state.items():
            tensors[f"{param_id}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": state_dict["param_groups"]}


def _optim_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        param_id, k = key.split(".", 1)
        state.setdefault(int(param_id), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _save_ckpt(
    path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, meta: dict
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    weights = {
        f"{name}.{k}": v.contiguous() for name, m in modules.items() for k, v in m.state_dict().items()
    }
    save_file(weights, tmp / "weights.safetensors")
    optim_tensors, optim_meta = _optim_state_to_tensors(opt)
    save_file({k: v.contiguous() for k, v in optim_tensors.items()}, tmp / "optim.safetensors")
    (tmp / "state.json").write_text(json.dumps({**meta, "optim": optim_meta}))
    if path.exists():
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    tmp.rename(path)


def _load_ckpt(path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer) -> dict:
    weights = load_file(path / "weights.safetensors")
    for name, m in modules.items():
        pre = name + "."
        m.load_state_dict({k[len(pre) :]: v for k, v in weights.items() if k.startswith(pre)})
    meta = json.loads((path / "state.json").read_text())
    opt.load_state_dict(_optim_state_from_tensors(load_file(path / "optim.safetensors"), meta["optim"]))
    return meta


# ----------------------------------------------------------------------------------------------- VAE


def train_vae(args: argparse.Namespace, out: Path) -> AutoencoderKL:
    torch.manual_seed(args.seed)
    vae = build.build_vae()
    final = out / "vae_final.safetensors"
    if final.exists():
        vae.load_state_dict(load_file(final))
        return vae
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    checkpoint = out / "ckpt_vae"
    start, before = 0, 0.0
    if checkpoint.exists():
        meta = _load_ckpt(checkpoint, {"vae": vae}, opt)
        start, before = meta["step"], meta.get("elapsed", 0.0)
        _log(out, f"vae: resumed at step {start}")
    t0 = time.time()
    bar = tqdm(range(start, args.vae_steps), desc="vae", mininterval=20)
    for step in bar:
        progress = _progress(step, args.vae_steps, before + time.time() - t0, args.vae_minutes)
        if progress >= 1:
            _log(out, f"vae: time budget reached after {step} steps")
            break
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, progress, args.vae_lr, 50)
        rng = np.random.default_rng([args.seed, 1, step])
        images = np.empty((args.vae_batch, data.IMAGE_SIZE, data.IMAGE_SIZE, 3), np.uint8)
        masks = np.empty((args.vae_batch, data.IMAGE_SIZE, data.IMAGE_SIZE), np.float32)
        for i in range(args.vae_batch):
            objs = data.sample_objects(rng)
            images[i] = np.round(data.render(objs, rng) * 255)
            masks[i] = data.object_mask(objs)
        x = _images_to_tensor(images)
        w = 1.0 + 4.0 * torch.from_numpy(masks)[:, None]  # weight object pixels: shapes and colours matter
        if (
            args.vae_crop < data.IMAGE_SIZE
        ):  # the VAE is fully convolutional: train on crops, 4x cheaper at 32
            cy, cx = (int(v) * 4 for v in rng.integers(0, (data.IMAGE_SIZE - args.vae_crop) // 4 + 1, size=2))
            x = x[:, :, cy : cy + args.vae_crop, cx : cx + args.vae_crop]
            w = w[:, :, cy : cy + args.vae_crop, cx : cx + args.vae_crop]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(torch.Generator().manual_seed(args.seed * 1_000_003 + step))).sample
        err = rec - x
        loss = (w * (err.abs() + err.pow(2))).mean() + args.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % 50 == 0:
            _log(
                out, f"vae step {step + 1}/{args.vae_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)"
            )
        if (step + 1) % args.ckpt_every == 0:
            done = {"step": step + 1, "elapsed": before + time.time() - t0}
            _save_ckpt(checkpoint, {"vae": vae}, opt, done)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, final)
    _timing(out, "vae_s", before + time.time() - t0)
    return vae


def _timing(out: Path, key: str, seconds: float) -> None:
    f = out / "timing.json"
    t = json.loads(f.read_text()) if f.exists() else {}
    t[key] = seconds  # callers pass the stage's total, resumed invocations included
    f.write_text(json.dumps(t, indent=1))
    _log(out, f"timing {key}: {seconds:.0f}s")


@torch.no_grad()
def cache_latents(args: argparse.Namespace, out: Path, vae: AutoencoderKL) -> tuple[torch.Tensor, list[str]]:
    f = out / "latents.safetensors"
    if f.exists():
        lat = load_file(f)["latents"]
        prompts = json.loads((out / "prompts.json").read_text())
        return lat, prompts
    t0 = time.time()
    prompts, images, _ = data.training_pairs(args.n_train, seed=args.seed + 100)
    vae.eval()
    chunks = []
    for i in tqdm(range(0, args.n_train, 256), desc="encode", mininterval=20):
        chunks.append(vae.encode(_images_to_tensor(images[i : i + 256])).latent_dist.mean)
    lat = torch.cat(chunks)
    save_file({"latents": lat.contiguous()}, f)
    (out / "prompts.json").write_text(json.dumps(prompts))
    _timing(out, "latents_s", time.time() - t0)
    return lat, prompts


# ---------------------------------------------------------------------------------------------- UNet


@torch.no_grad()
def probe_positions(
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tok: Any,
    scale: float,
    seed: int,
) -> dict[str, float]:
    """Quick check on single-object prompts: is the most saturated grid cell the prompted one, and is the
    colour there right? 9 positions x 2 seeds, 15 DPM-Solver steps, guidance 5."""
    objs = [data.Obj(p % len(data.COLOURS), p % len(data.SHAPES), p) for p in range(data.N_POS)] * 2
    prompts = [data.prompt_for([o]) for o in objs]
    cond = build.encode_prompts(tok, text_encoder, prompts)
    uncond = build.encode_prompts(tok, text_encoder, [""] * len(prompts))
    g = torch.Generator().manual_seed(seed)
    lat = build.denoise(unet, build.build_inference_scheduler(), cond, uncond, 5.0, 15, g)
    img = (vae.decode(lat / scale).sample.clamp(-1, 1) + 1) / 2  # [n, 3, H, W]
    sat = img.max(1).values - img.min(1).values
    palette = torch.tensor(list(data.COLOURS.values()), dtype=torch.float32) / 255
    pos_ok = col_ok = 0
    h = data.OBJECT_HALF
    for i, o in enumerate(objs):
        cells = []
        for p in range(data.N_POS):
            cy, cx = data.CELL_CENTERS[p // data.GRID], data.CELL_CENTERS[p % data.GRID]
            cells.append(sat[i, cy - h : cy + h, cx - h : cx + h].mean())
        best = int(torch.stack(cells).argmax())
        pos_ok += best == o.pos
        cy, cx = data.CELL_CENTERS[o.pos // data.GRID], data.CELL_CENTERS[o.pos % data.GRID]
        patch = img[i, :, cy - h : cy + h, cx - h : cx + h].reshape(3, -1)
        s = sat[i, cy - h : cy + h, cx - h : cx + h].reshape(-1)
        if s.max() > 0.3:
            mean = patch[:, s > 0.5 * s.max()].mean(1)
            col_ok += int(((palette - mean) ** 2).sum(1).argmin()) == o.colour
    return {"pos_acc": pos_ok / len(objs), "colour_at_pos_acc": col_ok / len(objs)}


def train_unet(
    args: argparse.Namespace, out: Path, vae: AutoencoderKL, lat: torch.Tensor, prompts: list[str]
) -> tuple[CLIPTextModel, UNet2DConditionModel, float]:
    torch.manual_seed(args.seed)
    tok = build.build_tokenizer()
    text_encoder = build.build_text_encoder(len(tok))
    unet = build.build_unet()
    scale = float(1.0 / lat.std())
    ema_te, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    for p in (*ema_te.parameters(), *ema_unet.parameters()):
        p.requires_grad_(False)
    params = [*text_encoder.parameters(), *unet.parameters()]
    ema_params = [*ema_te.parameters(), *ema_unet.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = build.build_train_scheduler()
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    if args.min_snr_gamma > 0:  # min-SNR-gamma for v-prediction: x0-error weight min(snr, gamma)
        loss_weight = torch.clamp(snr, max=args.min_snr_gamma) / (snr + 1)
    else:  # plain v-loss: x0-error weight snr + 1, so high-noise steps (where layout is set) still count
        loss_weight = torch.ones_like(snr)
    ids_all = build.tokenize(tok, prompts)
    ids_empty = build.tokenize(tok, [""])[0]
    modules = {"te": text_encoder, "unet": unet, "ema_te": ema_te, "ema_unet": ema_unet}
    checkpoint = out / "ckpt_unet"
    start, before = 0, 0.0
    if checkpoint.exists():
        meta = _load_ckpt(checkpoint, modules, opt)
        start, before = meta["step"], meta.get("elapsed", 0.0)
        _log(out, f"unet: resumed at step {start}")
    _log(
        out,
        f"unet {unet.num_parameters() / 1e6:.2f}M params, "
        f"text encoder {text_encoder.num_parameters() / 1e6:.2f}M, "
        f"latent scale {scale:.4f}, {len(prompts)} training pairs",
    )
    t0 = time.time()
    bar = tqdm(range(start, args.unet_steps), desc="unet", mininterval=20)
    step = start
    for step in bar:
        progress = _progress(step, args.unet_steps, before + time.time() - t0, args.unet_minutes)
        if progress >= 1:
            _log(out, f"unet: time budget reached after {step} steps")
            break
        lr = _lr_at(step, progress, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng([args.seed, 2, step])
        idx = torch.from_numpy(rng.integers(len(prompts), size=args.batch))
        drop = torch.from_numpy(rng.random(args.batch) < args.caption_dropout)
        ids = torch.where(drop[:, None], ids_empty[None], ids_all[idx])
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        x0 = lat[idx] * scale
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        emb = text_encoder(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=emb).sample
        target = sched.get_velocity(x0, noise, t)  # build.SCHEDULER_CONFIG predicts v
        loss = (loss_weight[t] * (pred - target).pow(2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % 50 == 0:
            _log(
                out,
                f"unet step {step + 1}/{args.unet_steps} loss {loss.item():.4f} lr {lr:.2e} "
                f"({time.time() - t0:.0f}s)",
            )
        if args.probe_every and (step + 1) % args.probe_every == 0:
            probe_start = time.time()
            r = probe_positions(vae, ema_unet, ema_te, tok, scale, args.seed)
            _log(out, f"probe step {step + 1}: {r} ({time.time() - probe_start:.0f}s)")
        if (step + 1) % args.ckpt_every == 0:
            _save_ckpt(checkpoint, modules, opt, {"step": step + 1, "elapsed": before + time.time() - t0})
    else:
        step = args.unet_steps
    _timing(out, "unet_s", before + time.time() - t0)
    finished = {"step": step, "elapsed": before + time.time() - t0, "finished": True}
    _save_ckpt(checkpoint, modules, opt, finished)
    _log(out, f"unet: finished at step {step}")
    return ema_te, ema_unet, scale


def export(
    path: Path, vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel, scale: float
) -> None:
    """Write the EMA weights as a StableDiffusionPipeline save_pretrained folder (safetensors)."""
    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scale)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build.build_tokenizer(),
        unet=unet,
        scheduler=build.build_inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    prefix_text_encoder_keys(path / "text_encoder" / "model.safetensors")


def prefix_text_encoder_keys(file: Path) -> None:
    """Rewrite a saved CLIPTextModel's weight names with the `text_model.` prefix that every transformers 5.x
    loads. Recent releases (5.24) save them without it, and earlier ones (5.0, the floor) then match no name
    and keep the whole text encoder at its random initialisation, saying so in a log line only. Tensors and
    metadata are kept as they are."""
    with safe_open(file, "pt") as weights:
        metadata = weights.metadata()
        tensors = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118 (not a dict)
    prefixed = {
        name if name.startswith("text_model.") else f"text_model.{name}": t for name, t in tensors.items()
    }
    save_file(prefixed, file, metadata=metadata)


def export_checkpoint(out: Path, path: Path) -> int:
    """Export the EMA weights of the latest UNet checkpoint in run folder `out`; returns its step."""
    vae = build.build_vae()
    vae.load_state_dict(load_file(out / "vae_final.safetensors"))
    lat = load_file(out / "latents.safetensors")["latents"]
    text_encoder, unet = build.build_text_encoder(len(build.build_tokenizer())), build.build_unet()
    weights = load_file(out / "ckpt_unet" / "weights.safetensors")
    for name, m in (("ema_te", text_encoder), ("ema_unet", unet)):
        m.load_state_dict({k[len(name) + 1 :]: v for k, v in weights.items() if k.startswith(name + ".")})
    export(path, vae, text_encoder, unet, float(1.0 / lat.std()))
    return json.loads((out / "ckpt_unet" / "state.json").read_text())["step"]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


#: What --export-only reads from the run folder.
EXPORT_NEEDS = ("vae_final.safetensors", "latents.safetensors", "ckpt_unet/weights.safetensors")


def _check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse values training cannot use with a one-line usage error, before any stage starts."""
    at_least = {
        "--seed": (args.seed, 0),
        "--vae-steps": (args.vae_steps, 0),
        "--unet-steps": (args.unet_steps, 0),
        "--vae-minutes": (args.vae_minutes, 0),
        "--unet-minutes": (args.unet_minutes, 0),
        "--vae-batch": (args.vae_batch, 1),
        "--n-train": (args.n_train, 1),
        "--batch": (args.batch, 1),
        "--vae-kl": (args.vae_kl, 0),
        "--warmup": (args.warmup, 0),
        "--min-snr-gamma": (args.min_snr_gamma, 0),
        "--probe-every": (args.probe_every, 0),
        "--ckpt-every": (args.ckpt_every, 1),
    }
    if args.threads is not None:
        at_least["--threads"] = (args.threads, 1)
    for flag, (value, low) in at_least.items():
        if not value >= low:  # also refuses nan
            ap.error(f"{flag} must be {low} or more, not {value}")
    for flag, value in (("--vae-lr", args.vae_lr), ("--lr", args.lr)):
        if not value > 0:
            ap.error(f"{flag} must be more than 0, not {value}")
    for flag, value in (("--ema", args.ema), ("--caption-dropout", args.caption_dropout)):
        if not 0 <= value <= 1:
            ap.error(f"{flag} must be between 0 and 1, not {value}")
    if not (4 <= args.vae_crop <= data.IMAGE_SIZE and args.vae_crop % 4 == 0):
        ap.error(
            f"--vae-crop must be a multiple of 4 from 4 to {data.IMAGE_SIZE} (the VAE downsamples twice), "
            f"not {args.vae_crop}"
        )


#: Options a rerun may change and still resume the run: they do not change the weights (threads only float
#: sums). Any other option differing from the run folder's args.json would mix two runs under the new args.
RESUMABLE_WITH_ANY = ("out", "export", "threads", "probe_every", "ckpt_every", "export_only")
STAGE_OUTPUTS = ("ckpt_vae", "vae_final.safetensors", "latents.safetensors", "ckpt_unet")


def _recorded_args(args: argparse.Namespace) -> dict[str, str]:
    """The options as the run folder's args.json records them (and `_check_resume` compares them)."""
    return {k: str(v) for k, v in vars(args).items()}


def _check_resume(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse to resume a run folder with settings other than those it was trained with."""
    recorded = args.out / "args.json"
    if not recorded.exists() or not any((args.out / f).exists() for f in STAGE_OUTPUTS):
        return
    before = json.loads(recorded.read_text())
    now = _recorded_args(args)
    changed = [k for k in now if k not in RESUMABLE_WITH_ANY and k in before and before[k] != now[k]]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {before[k]}" for k in changed)
        ap.error(
            f"{args.out} holds a run trained with {was}; resume it with the same values or give a new --out"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m imptome.miniature.train", description=__doc__, formatter_class=_HelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("runs/miniature"), help="run folder (checkpoints, logs)")
    ap.add_argument("--export", type=Path, default=None, help="save_pretrained folder for the final pipeline")
    ap.add_argument("--seed", type=int, default=0, help="seed of every stage")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (None: PyTorch's, all cores)")
    ap.add_argument("--vae-steps", type=int, default=1500, help="VAE training steps")
    ap.add_argument("--vae-minutes", type=float, default=0.0, help="VAE time budget (0: none)")
    ap.add_argument("--vae-crop", type=int, default=32, help="train the VAE on random square crops")
    ap.add_argument("--vae-batch", type=int, default=32, help="VAE batch size")
    ap.add_argument("--vae-lr", type=float, default=2e-3, help="VAE learning rate")
    ap.add_argument("--vae-kl", type=float, default=1e-6, help="weight of the VAE's KL term")
    ap.add_argument("--n-train", type=int, default=20000, help="training images (latents cached once)")
    ap.add_argument("--unet-steps", type=int, default=8000, help="text encoder + UNet training steps")
    ap.add_argument("--unet-minutes", type=float, default=0.0, help="UNet time budget (0: none)")
    ap.add_argument("--batch", type=int, default=32, help="UNet batch size")
    ap.add_argument(
        "--lr", type=float, default=1e-3, help="UNet learning rate after warm-up (cosine decay to 10%%)"
    )
    ap.add_argument("--warmup", type=int, default=50, help="learning-rate warm-up steps")
    ap.add_argument("--ema", type=float, default=0.995, help="EMA decay of the exported weights")
    ap.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty captions (for CFG)")
    ap.add_argument("--min-snr-gamma", type=float, default=0.0, help="0: plain (unweighted) v-loss")
    ap.add_argument("--probe-every", type=int, default=200, help="steps between position probes (0: none)")
    ap.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints")
    ap.add_argument("--export-only", action="store_true", help="export the latest checkpoint's EMA and exit")
    args = ap.parse_args(argv)
    _check_args(ap, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.export_only and args.export is None:
        ap.error("--export-only needs --export FOLDER (where to save the pipeline)")
    if args.export_only:
        missing = [f for f in EXPORT_NEEDS if not (args.out / f).exists()]
        if missing:
            missed = ", ".join(missing)
            ap.error(f"--export-only: {args.out} holds no trained run to export (missing {missed})")
        step = export_checkpoint(args.out, args.export)
        print(f"exported step {step} to {args.export}")
        return
    _check_resume(ap, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "args.json").write_text(json.dumps(_recorded_args(args), indent=1))
    t0 = time.time()
    vae = train_vae(args, args.out).eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    lat, prompts = cache_latents(args, args.out, vae)
    text_encoder, unet, scale = train_unet(args, args.out, vae, lat, prompts)
    if args.export:
        export(args.export, vae, text_encoder, unet, scale)
        _log(args.out, f"exported pipeline to {args.export}")
    _log(args.out, f"done in {time.time() - t0:.0f}s this invocation")


if __name__ == "__main__":
    main()
