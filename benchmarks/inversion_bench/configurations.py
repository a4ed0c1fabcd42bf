"""What the benchmark times: the package configurations, the inner-loop modes, the default prompt.

`CONFIGURATIONS` is the list to extend when the package gains an option worth timing.
"""

from __future__ import annotations

from typing import Any

#: The package configurations timed, by name: keyword arguments passed to `nti_lightning.invert`.
#: Add a line to time a new option. A configuration with an option `invert` does not take is
#: skipped with a note, so this list may name options before the package has them.
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "fp32+reuse": {"reuse_cond_output": True},
    "fp32+reuse+sync-free": {"reuse_cond_output": True, "early_exit": False},
    "fp32+reuse+channels-last": {"reuse_cond_output": True, "channels_last": True},
    "bf16": {"precision": "bf16-mixed"},
    "bf16+reuse": {"precision": "bf16-mixed", "reuse_cond_output": True},
    "fp16+reuse": {"precision": "16-mixed", "reuse_cond_output": True},
    "bf16+reuse+compile": {"precision": "bf16-mixed", "reuse_cond_output": True, "compile": True},
    "bf16+checkpointing": {"precision": "bf16-mixed", "gradient_checkpointing": True},
    # The default scheduling is continuous batching; lockstep (a batch's images walk their
    # timesteps together) is kept for comparison.
    "fp32+lockstep": {"scheduling": "lockstep"},
    "bf16+lockstep": {"precision": "bf16-mixed", "scheduling": "lockstep"},
    "bf16+reuse+cuda-graphs": {
        "precision": "bf16-mixed",
        "reuse_cond_output": True,
        "early_exit": False,
        "compile": True,
        "compile_mode": "reduce-overhead",
    },
}

#: The configuration every other one is compared with in the fidelity check.
FIDELITY_REFERENCE = "fp32"

#: Inner-loop modes, by name: the early-stop ε. A negative ε is never reached, so every image
#: runs all N inner iterations at every step: the cost of the algorithm with no luck.
MODES: dict[str, float] = {"full": -1.0, "early-stop": 1e-5}

#: Precisions Lightning runs only on a GPU.
CUDA_ONLY_PRECISIONS = {"16-mixed"}

DEFAULT_PROMPT = "a photograph of a cat sitting next to a mirror"
