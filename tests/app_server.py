"""The app as the tests serve it: `nti app`'s own page, in this process, on a free local port.

Small settings keep every inversion to seconds on a CPU: the `shapes` model at T = 25, N = 10,
with the colour swap of tests/test_shapes_model.py (Replace, cross-attention 0.8, self-attention
0.7, LocalBlend on the shape word). At these settings the red -> blue edit of the demo image
turns every pixel of the circle (2 px in from its edge) blue; at T = 10-20 the blue circle comes
out a pixel or two smaller than the red one.
"""

from __future__ import annotations

import colorsys
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from nti_lightning.app.cli import make_page, parser

ROOT = Path(__file__).resolve().parents[1]
DEMO_IMAGE = ROOT / "configs" / "images" / "demo_red_circle.png"
DEMO_PROMPT = "a red circle on a green background"
BLUE_PROMPT = "a blue circle on a green background"
STEPS, INNER_STEPS, SELF_REPLACE_STEPS = 25, 10, 0.7


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningApp:
    """A served app: its URL, its `Page` (and `Editor`), and a count of UNet forward passes."""

    url: str
    page: Any
    blocks: Any
    unet_calls: list[int] = field(default_factory=lambda: [0])

    @property
    def editor(self) -> Any:
        return self.page.editor


@contextmanager
def running_app(cache_dir: Path, downloads: Path, *extra: str) -> Iterator[RunningApp]:
    """`nti app --cache-dir CACHE --model.num_inference_steps 25 ...` served until the block ends."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # The test process's own thread count: the rest of the suite runs in this process too.
    args = parser().parse_args([
        "--threads", str(torch.get_num_threads()),
        "--cache-dir", str(cache_dir), "--trainer.accelerator", "cpu",
        "--model.num_inference_steps", str(STEPS), "--model.num_inner_steps", str(INNER_STEPS),
        "--model.self_replace_steps", str(SELF_REPLACE_STEPS), *extra,
    ])
    from nti_lightning.app.layout import launch_options

    page = make_page(args, downloads)
    blocks = page.build().queue(default_concurrency_limit=1, max_size=args.max_queue)
    app = RunningApp("", page, blocks)

    def count(module: Any, inputs: Any) -> None:
        app.unet_calls[0] += 1

    hook = page.editor.pipeline.unet.register_forward_pre_hook(count)
    port = free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, **launch_options())
    app.url = f"http://127.0.0.1:{port}/"
    try:
        yield app
    finally:
        hook.remove()
        blocks.close()


def hue(rgb: np.ndarray) -> float:
    """Hue in degrees of an RGB colour in 0-255."""
    return 360.0 * colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=np.float64) / 255.0))[0]


def colour_regions(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(inside, outside) masks at `size` px of the demo image: the circle's pixels away from its
    edge, and the background's away from the circle (the edge mixes both colours)."""
    pixels = np.asarray(Image.open(DEMO_IMAGE).convert("RGB"), dtype=np.int32)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 100)
    green = (pixels[..., 1] > 150) & (pixels[..., 0] < 100)
    inside, outside = _eroded(red, 2), _eroded(green, 2)
    scale = size // pixels.shape[0]
    return np.kron(inside, np.ones((scale, scale), bool)), np.kron(outside, np.ones((scale, scale), bool))


def _eroded(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        padded = np.pad(mask, 1, constant_values=False)
        mask = mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask


def assert_recoloured(edited: np.ndarray) -> dict[str, float]:
    """Asserts that an edit of the demo image turned the circle blue and kept the background
    green; returns the measured hues."""
    inside, outside = colour_regions(edited.shape[0])
    circle, background = edited[inside].mean(0), edited[outside].mean(0)
    measured = {"circle_hue": hue(circle), "background_hue": hue(background)}
    assert 200 <= measured["circle_hue"] <= 260 and circle[2] > circle[0] + 60, (measured, circle)
    assert 90 <= measured["background_hue"] <= 150 and background[1] > background[0] + 60, (measured, background)
    blue_share = float(np.mean([200 <= hue(p) <= 260 for p in edited[inside]]))
    assert blue_share >= 0.9, blue_share
    return {**measured, "blue_share": blue_share}
