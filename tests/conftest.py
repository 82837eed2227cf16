"""Make ``tests/`` importable (``from factories import ...``) from tests in any subfolder and import mode."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
