"""PIE-Bench (Ju et al., 2023), the field's benchmark of inversion-and-edit methods: its mapping
file as a dataset and as edits (`pie`), its masks, its metrics as its evaluator computes them, and
scoring a folder of outputs in its authors' layout. See docs/PIE_BENCH.md."""

from nti_lightning.bench.metrics import (
    METRICS,
    clip_image_features,
    clip_similarity,
    clip_text_features,
    dino_input,
    dino_keys,
    dino_self_similarity,
    keys_self_similarity,
    lpips_unedited,
    mse_unedited,
    psnr_unedited,
    ssim_unedited,
    structure_distance,
)
from nti_lightning.bench.score import (
    BenchScores,
    edit_panel,
    read_samples,
    score_folder,
    score_sample,
)
from nti_lightning.bench.summary import PAPER_SCALE, markdown_summary, summarize
from nti_lightning.bench.weights import BenchNetworks, load_networks
from nti_lightning.data.pie_masks import decode_mask, encode_mask

__all__ = [
    "METRICS",
    "PAPER_SCALE",
    "BenchNetworks",
    "BenchScores",
    "clip_image_features",
    "clip_similarity",
    "clip_text_features",
    "decode_mask",
    "dino_input",
    "dino_keys",
    "dino_self_similarity",
    "edit_panel",
    "encode_mask",
    "keys_self_similarity",
    "load_networks",
    "lpips_unedited",
    "markdown_summary",
    "mse_unedited",
    "psnr_unedited",
    "read_samples",
    "score_folder",
    "score_sample",
    "ssim_unedited",
    "structure_distance",
    "summarize",
]
