"""Attribute classifier for miniature images: per grid cell, empty or (colour, shape).

A small CNN trained on procedural images (with blur/noise augmentation so it also reads VAE-decoded
generations). Its penultimate features serve for a Frechet distance between image sets.

    python -m imptome.miniature.classifier --steps 600                       # procedural images
    python -m imptome.miniature.classifier --steps 400 --init src/imptome/miniature/classifier \
        --vae src/imptome/miniature/model --lr 1e-3                           # + VAE reconstructions
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from . import data

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

CLASSIFIER_DIR = Path(__file__).parent / "classifier"
EMPTY = -1


class AttributeClassifier(nn.Module):
    """CNN: 64x64 RGB in [0, 1] -> per position logits over (empty, colour x shape)."""

    def __init__(self, width: int = 32, feat_dim: int = 256) -> None:
        super().__init__()
        self.width, self.feat_dim = width, feat_dim  # saved with the weights (config.json)
        w = width

        def block(i: int, o: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.body = nn.Sequential(  # 64 -> 32 -> 16 -> 8
            block(3, w // 2, 2),
            block(w // 2, w, 1),
            block(w, 2 * w, 2),
            block(2 * w, 2 * w, 1),
            block(2 * w, 4 * w, 2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 64, feat_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feat_dim, data.N_POS * (data.N_CLASSES + 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [n, feat_dim]."""
        return self.fc(self.body(x * 2 - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [n, N_POS, N_CLASSES + 1]; class 0 is empty, class k + 1 is Obj.cls == k."""
        return self.head(self.features(x)).view(-1, data.N_POS, data.N_CLASSES + 1)


def to_tensor(images: Any) -> torch.Tensor:
    """PIL list, uint8 array [n, H, W, 3] or float tensor [n, 3, H, W] in [0, 1] -> float tensor in [0, 1]."""
    if torch.is_tensor(images):
        x = images.float()
    else:
        if isinstance(images, Image.Image) or (
            isinstance(images, list) and isinstance(images[0], Image.Image)
        ):
            imgs = images if isinstance(images, list) else [images]
            images = np.stack([np.asarray(im.convert("RGB")) for im in imgs])
        arr = np.asarray(images)
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
        if arr.dtype == np.uint8:
            x = x / 255.0
    if x.shape[-1] != data.IMAGE_SIZE:
        x = F.interpolate(x, size=(data.IMAGE_SIZE, data.IMAGE_SIZE), mode="bilinear", antialias=True)
    return x.clamp(0, 1)


def load_classifier(path: str | Path | None = None) -> AttributeClassifier:
    """Load the shipped classifier (eval mode)."""
    d = Path(path) if path is not None else CLASSIFIER_DIR
    f = d / "model.safetensors"
    if not f.exists():
        raise FileNotFoundError(
            f"no classifier weights at {f}; train with `python -m imptome.miniature.classifier`"
        )
    cfg = json.loads((d / "config.json").read_text())
    model = AttributeClassifier(cfg["width"], cfg["feat_dim"])
    model.load_state_dict(load_file(f))
    return model.eval()


@functools.cache
def _default() -> AttributeClassifier:
    return load_classifier()


@torch.no_grad()
def classify(images: Any, model: AttributeClassifier | None = None, batch: int = 256) -> torch.Tensor:
    """Per-position predictions [n, N_POS]: EMPTY (-1) or the (colour, shape) class Obj.cls."""
    m = model or _default()
    x = to_tensor(images)
    out = [m(x[i : i + batch]).argmax(-1) - 1 for i in range(0, len(x), batch)]
    return torch.cat(out)


@torch.no_grad()
def features(images: Any, model: AttributeClassifier | None = None, batch: int = 256) -> torch.Tensor:
    """Penultimate features [n, d] for Frechet distances."""
    m = model or _default()
    x = to_tensor(images)
    return torch.cat([m.features(x[i : i + batch]) for i in range(0, len(x), batch)])


def describe(pred: torch.Tensor) -> list[list[data.Obj]]:
    """Turn classify() output into object lists."""
    out = []
    for row in pred.tolist():
        out.append(
            [
                data.Obj(c // len(data.SHAPES), c % len(data.SHAPES), p)
                for p, c in enumerate(row)
                if c != EMPTY
            ]
        )
    return out


def score(images: Any, prompts: list[str], model: AttributeClassifier | None = None) -> dict[str, Any]:
    """Score images against their prompts.

    Per prompted object: `anywhere` = some cell holds the right colour and shape; `at_position` = the prompted
    cell does. `extra` counts drawn objects the prompt did not ask for. Returns means and per-image lists.
    """
    pred = classify(images, model)
    anywhere, at_pos, extra, per_image = [], [], 0, []
    for row, prompt in zip(pred.tolist(), prompts, strict=True):
        objs = data.parse_prompt(prompt)
        hits = []
        for o in objs:
            a, p = o.cls in row, row[o.pos] == o.cls
            anywhere.append(a)
            at_pos.append(p)
            hits.append((a, p))
        wanted = {o.pos for o in objs}
        extra += sum(1 for q, c in enumerate(row) if c != EMPTY and q not in wanted)
        per_image.append(hits)
    return {
        "objects": len(anywhere),
        "colour_shape_acc": float(np.mean(anywhere)),
        "position_acc": float(np.mean(at_pos)),
        "extra_objects_per_image": extra / len(prompts),
        "per_image": per_image,
    }


# ------------------------------------------------------------------------------------------ training


def _batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural batch with 0-3 objects (held-out triples included) and blur/noise augmentation."""
    imgs = np.empty((n, data.IMAGE_SIZE, data.IMAGE_SIZE, 3), np.float32)
    labels = np.zeros((n, data.N_POS), np.int64)
    for i in range(n):
        k = int(rng.choice(4, p=[0.1, 0.4, 0.35, 0.15]))
        objs = []
        for p in rng.choice(data.N_POS, size=k, replace=False):
            objs.append(
                data.Obj(int(rng.integers(len(data.COLOURS))), int(rng.integers(len(data.SHAPES))), int(p))
            )
        imgs[i] = data.render(objs, rng)
        for o in objs:
            labels[i, o.pos] = o.cls + 1
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    sigma = float(rng.uniform(0.01, 1.2))
    taps = torch.arange(-2, 3, dtype=torch.float32)
    g = torch.exp(-(taps**2) / (2 * sigma**2))
    g = g / g.sum()
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), g.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), g.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)
    x = x + torch.from_numpy(rng.normal(0, rng.uniform(0, 0.04), size=x.shape).astype(np.float32))
    return x.clamp(0, 1), torch.from_numpy(labels)


def load_vae(path: str | Path) -> AutoencoderKL:
    """A trained miniature VAE: a pipeline folder (its vae/ subfolder, safetensors only) or a safetensors
    state dict."""
    from diffusers import AutoencoderKL

    from . import build

    p = Path(path)
    if p.is_dir():
        return AutoencoderKL.from_pretrained(p, subfolder="vae", use_safetensors=True).eval()
    vae = build.build_vae()
    vae.load_state_dict(load_file(p))
    return vae.eval()


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] through the VAE (posterior mean) and back."""
    return (vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2


def train(
    steps: int = 800,
    batch: int = 64,
    seed: int = 0,
    out: Path = CLASSIFIER_DIR,
    vae_path: str | Path | None = None,
    init: str | Path | None = None,
    lr: float = 2e-3,
) -> dict[str, Any]:
    """Train the classifier and write model.safetensors + config.json to `out`.

    With `vae_path`, half of every batch is passed through that VAE first, so the classifier also reads the
    (slightly blurred) images the miniature model's decoder produces. `init` continues from saved weights.
    """
    torch.manual_seed(seed)
    model = load_classifier(init).train() if init else AttributeClassifier()
    vae = load_vae(vae_path) if vae_path else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 20), pct_start=0.1)
    t0 = time.time()
    bar = tqdm(range(steps), desc="classifier", mininterval=10)
    for step in bar:
        x, y = _batch(np.random.default_rng([seed, 3, step]), batch)
        if vae is not None:
            xr, yr = _batch(np.random.default_rng([seed, 5, step]), batch // 2)
            x = torch.cat([x[: batch - batch // 2], reconstruct(vae, xr)])
            y = torch.cat([y[: batch - batch // 2], yr])
        loss = F.cross_entropy(model(x).reshape(-1, data.N_CLASSES + 1), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.eval()
    x, y = _batch(np.random.default_rng([seed, 4]), 500)
    info: dict[str, Any] = {"width": model.width, "feat_dim": model.feat_dim}
    info.update(steps=steps, batch=batch, seed=seed)
    with torch.no_grad():
        info["cell_accuracy_procedural"] = float((model(x).argmax(-1) == y).float().mean())
        if vae is not None:
            info["cell_accuracy_vae_reconstructed"] = float(
                (model(reconstruct(vae, x)).argmax(-1) == y).float().mean()
            )
    prev = json.loads((Path(init) / "config.json").read_text()) if init else {}
    info["train_seconds"] = round(time.time() - t0) + prev.get("train_seconds", 0)
    info["history"] = [*prev.get("history", []), {"steps": steps, "vae": str(vae_path) if vae_path else None}]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(info, indent=1))
    return info


def _check_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse values training cannot use with a one-line usage error, before anything is written."""
    least_batch = 2 if a.vae else 1  # with --vae, half of each batch is reconstructed
    for flag, value, low in (
        ("--steps", a.steps, 1),
        ("--batch", a.batch, least_batch),
        ("--seed", a.seed, 0),
        ("--threads", a.threads, 1),
    ):
        if value < low:
            ap.error(f"{flag} must be {low} or more, not {value}")
    if not a.lr > 0:
        ap.error(f"--lr must be more than 0, not {a.lr}")
    if a.init is not None and not (Path(a.init) / "model.safetensors").is_file():
        ap.error(f"--init {a.init} holds no classifier (no model.safetensors)")
    if a.vae is not None and not Path(a.vae).exists():
        ap.error(f"--vae {a.vae}: no such pipeline folder or safetensors file")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=CLASSIFIER_DIR)
    ap.add_argument(
        "--vae", default=None, help="VAE (pipeline folder or safetensors) for reconstructed inputs"
    )
    ap.add_argument("--init", default=None, help="classifier folder to continue from")
    ap.add_argument("--lr", type=float, default=2e-3)
    a = ap.parse_args(argv)
    _check_args(ap, a)
    torch.set_num_threads(a.threads)
    print(train(a.steps, a.batch, a.seed, a.out, a.vae, a.init, a.lr))


if __name__ == "__main__":
    main()
