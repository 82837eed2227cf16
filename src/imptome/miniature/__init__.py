"""The miniature text-to-image model shipped with imptome: procedural data, training, attribute classifier.

`StableDiffusionPipeline.from_pretrained(imptome.miniature.miniature_path())` loads it offline.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"

#: The CFG scale that suits the bundled model (prompt accuracy 95.7% at 5 against 87.0% at 7.5, see Results).
GUIDANCE = 5.0


def miniature_path() -> Path:
    """Folder of the shipped miniature StableDiffusionPipeline (save_pretrained layout, safetensors)."""
    if not (MODEL_DIR / "model_index.json").exists():
        raise FileNotFoundError(
            f"the miniature model is missing at {MODEL_DIR}; train it with "
            "`python -m imptome.miniature.train --export src/imptome/miniature/model`"
        )
    return MODEL_DIR


__all__ = ["GUIDANCE", "MODEL_DIR", "miniature_path"]
