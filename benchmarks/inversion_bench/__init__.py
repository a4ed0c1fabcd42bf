"""The parts of `benchmarks/benchmark_inversion.py`, the inversion speed benchmark (its entry point).

- `configurations`: what is timed: the package configurations, the inner-loop modes, the prompt;
- `inputs`: the pipeline to time, the seeded random images, the baseline reference loops;
- `measure`: timing one run (wall clock, peak memory, UNet rows) of the baseline or the package;
- `fidelity`: how far each configuration's inversions are from the fp32 ones;
- `report`: the rows, the Markdown table, an earlier run's baseline, the environment record.

Importing the package puts the repository and its `tests/` folder on `sys.path` (see below), so
its modules import `nti_lightning` from this checkout and the reference loops from `tests/`.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# The baseline is the test suite's reference loop, which lives in the repository, not the package
# (tests/, imported as the tests import it).
for folder in (REPO_ROOT, REPO_ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
