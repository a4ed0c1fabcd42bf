"""Edit seconds per image of each editor, one edit at a time against a batch of edits.

    python benchmarks/editor_speed.py --model shapes --steps 50 --batch-sizes 1 8
    python benchmarks/editor_speed.py --model sd15-random --resolution 512 --steps 3 --batch-sizes 1 4

Inverts B random images once with Direct Inversion (untimed), then for each editor (Prompt-to-Prompt's
Replace, MasaCtrl, Plug-and-Play, Pix2Pix-Zero, each with its default settings) edits them with one
target prompt each: B edits one at a time (`edit_latents`), then the B edits in one batch
(`edit_jobs_latents`), after an untimed warm-up edit. It prints seconds per edit for both and
appends the record as one JSON line to `--output`. Seconds scale with T (`--steps`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import nti_lightning as nti
from nti_lightning.editing import EDITORS, Replace
from nti_lightning.editing.edit import EditJob, edit_jobs_latents, edit_latents
from nti_lightning.editing.editors import P2P, editor_settings

# The random images, the prompts and the record as method_speed.py (beside this file) makes them.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from method_speed import PROMPT, TARGET, images, run_record  # noqa: E402


def job(pipe: Any, inversion: Any, editor: str) -> EditJob:
    """One edit of `inversion` to TARGET by `editor` (its default settings)."""
    prompts = [PROMPT, TARGET]
    if editor == P2P:
        return EditJob(inversion, prompts, Replace(prompts, pipe.tokenizer, 0.8, 0.6))
    return EditJob(inversion, prompts, editor=editor_settings(editor))


def time_editor(pipe: Any, inversions: Sequence[Any], editor: str) -> dict[str, Any]:
    """Seconds per edit of `editor` on `inversions`, one at a time and all in one batch."""
    with torch.no_grad():
        warm = job(pipe, inversions[0], editor)
        edit_latents(pipe, warm.inversion, warm.prompts, controller=warm.controller, editor=warm.editor)
        started = time.perf_counter()
        for inversion in inversions:
            single = job(pipe, inversion, editor)
            edit_latents(pipe, inversion, single.prompts, controller=single.controller, editor=single.editor)
        alone_s = time.perf_counter() - started
        started = time.perf_counter()
        edit_jobs_latents(pipe, [job(pipe, inversion, editor) for inversion in inversions])
        batched_s = time.perf_counter() - started
    count = len(inversions)
    return {"editor": editor, "edits": count, "alone_s_per_edit": alone_s / count,
            "batched_s_per_edit": batched_s / count}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", help="any model nti fit takes (shapes)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in px (the model's own)")
    parser.add_argument("--steps", type=int, default=50, help="T (50)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8], help="numbers of edits B (8)")
    parser.add_argument("--editors", nargs="+", default=list(EDITORS), choices=list(EDITORS), metavar="EDITOR",
                        help="the editors (every one)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch's default)")
    parser.add_argument("--output", default=None, help="append the record as one JSON line to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = nti.load_pipeline(args.model)
    size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    rows = []
    for batch in args.batch_sizes:
        inversions = nti.invert(pipe, images(batch, size), PROMPT, method="direct", num_inference_steps=args.steps,
                                batch_size=batch, progress_bar=False)
        for editor in args.editors:
            rows.append(time_editor(pipe, list(inversions), editor))
            row = rows[-1]
            print(f"{editor:10s} B={batch:<3d} alone {row['alone_s_per_edit']:8.3f} s/edit   "
                  f"batched {row['batched_s_per_edit']:8.3f} s/edit", flush=True)
    return run_record({"model": args.model, "resolution": size, "steps": args.steps}, rows, args.output)

if __name__ == "__main__":
    main()
