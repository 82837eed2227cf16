"""Loading pipelines the ecosystem's way: a local folder, the bundled miniature model, or a hub id."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.import_utils import compare_versions

from imptome.cli import DTYPE_NAMES, CliError, check_model
from imptome.patch.api import find_denoiser

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# from_pretrained's dtype argument: `dtype` since diffusers 0.40, which deprecates `torch_dtype`; older
# versions know only `torch_dtype` and would ignore `dtype` (loading float32) with a logged warning
_DTYPE_ARGUMENT = "dtype" if compare_versions("diffusers", ">=", "0.40.0") else "torch_dtype"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str:
    """`device`, or the default one when None, checked to exist here; a CliError names what is wrong."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise CliError(f"--device {device}: not a device name; use e.g. cpu, cuda or cuda:1") from None
    if parsed.type == "cpu":
        return device
    backend = torch.backends.mps if parsed.type == "mps" else getattr(torch, parsed.type, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is None or not is_available():
        raise CliError(f"--device {device}: no {parsed.type} device is available here (use --device cpu)")
    count = getattr(backend, "device_count", lambda: 1)()
    if parsed.index is not None and parsed.index >= count:
        raise CliError(f"--device {device}: there are {count} {parsed.type} devices here, numbered from 0")
    return device


_HASHED_BYTES = 256 << 20  # larger files are identified by size and modification time instead of content


def model_fingerprint(source: str) -> str:
    """What identifies a model's weights in saved results, so that a model retrained in the same folder is
    not mixed with results of the old one: for a local folder a SHA-256 over its files' names and contents
    (size and modification time for files over 256 MB, which hashing would take seconds to read), for a
    hub id the id itself."""
    path = Path(source)
    if not path.is_dir():
        return source
    digest = hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        stat = file.stat()
        if stat.st_size > _HASHED_BYTES:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            continue
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def load_pipeline(model: str | None = None, device: str | None = None, dtype: str = "float32"):
    """A DiffusionPipeline on `device` in `dtype`, progress bar off; safety checker never loaded. A CliError
    when it cannot be loaded, or has no denoiser imptome can patch."""
    source = check_model(model)
    if dtype not in DTYPES:
        raise CliError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    device = check_device(device)
    local = Path(source).is_dir()
    try:
        components = DiffusionPipeline.load_config(source, local_files_only=local)
        # never load a safety checker; pipelines without one would warn about the unexpected argument
        no_checker = {"safety_checker": None} if "safety_checker" in components else {}
        pipe = DiffusionPipeline.from_pretrained(
            source,
            local_files_only=local,
            use_safetensors=True,
            **{_DTYPE_ARGUMENT: DTYPES[dtype]},
            **no_checker,
        )
    except (OSError, ValueError) as error:  # no such hub id, no internet, missing files or components
        cause = f" (cause: {error.__cause__})" if error.__cause__ is not None else ""
        hint = (
            ""
            if local
            else "; a hub id needs internet on first use (HF_HUB_OFFLINE=1 skips the retries where there is "
            "none), or give a local pipeline folder"
        )
        message = str(error).replace(" Please check out the root cause in the stacktrace above.", "")
        raise CliError(f"cannot load {source}: {message.rstrip('. ')}{cause}{hint}") from None
    try:  # every command runs the pipeline with and without a patch, so one imptome cannot patch is refused
        find_denoiser(pipe)
    except TypeError as error:
        raise CliError(f"cannot use {source}: {error}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
