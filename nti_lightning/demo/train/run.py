"""The whole training run, `train_demo`, and its command line, `main` (`nti train-demo`).

`train_demo` builds the untrained parts, runs the VAE stage, sets the latent scaling factor, runs
the diffusion stage and the refinement under one wall-clock budget, and saves the pipeline with
its summary; the Lightning trainer, the data loader and the progress lines of each stage are made
here too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from nti_lightning.demo.shapes import ShapesDataset
from nti_lightning.demo.train.components import (
    build_text_encoder,
    build_unet,
    build_vae,
)
from nti_lightning.demo.train.config import DemoConfig
from nti_lightning.demo.train.diffusion_stage import DiffusionStage
from nti_lightning.demo.train.export import save_fp16
from nti_lightning.demo.train.vae_stage import (
    VAEStage,
    heldout_vae_psnr,
    latent_scaling_factor,
)
from nti_lightning.models.tiny import assemble_pipeline
from nti_lightning.models.tokenizer import clip_tokenizer

# Lightning warns that a DataLoader without workers may be slow; here the data costs ~0.1 ms a
# sample and worker processes would take the cores the training needs.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


class ProgressPrinter(pl.Callback):
    """Prints one line every `every` steps (a progress bar floods the log of a background run).

    Args:
        name (`str`): the stage's name.
        every (`int`, defaults to 100): steps between lines.
    """

    def __init__(self, name: str, every: int = 100) -> None:
        self.name = name
        self.every = every
        self.start = time.monotonic()

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_index: int
    ) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
            shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items())
            print(
                f"[{self.name}] step {step}/{trainer.max_steps} {shown} ({time.monotonic() - self.start:.0f} s)",
                flush=True,
            )


def _trainer(
    name: str, steps: int, max_seconds: float, config: DemoConfig, log_dir: Optional[str], quiet: bool
) -> pl.Trainer:
    if log_dir:
        from lightning.pytorch.loggers import TensorBoardLogger

        logger: Any = TensorBoardLogger(save_dir=log_dir, name=name)
    else:
        logger = False
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=1,  # one pass over a dataset sized to the steps
        max_time={"seconds": max(1.0, max_seconds)},
        gradient_clip_val=config.gradient_clip,
        logger=logger,
        log_every_n_steps=25,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[] if quiet else [ProgressPrinter(name)],
    )


def _loader(steps: int, batch_size: int, config: DemoConfig, seed: int, recoloured: bool, start: int = 0) -> DataLoader:
    # In index order: the samples are already random, and an ordered stream is reproducible.
    dataset = ShapesDataset(steps * batch_size, "train", seed, config.resolution, recoloured, start)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, drop_last=True)


def train_demo(
    output: str | Path,
    seed: int = 0,
    max_minutes: float = 60.0,
    config: Optional[DemoConfig] = None,
    log_dir: Optional[str] = "runs/train-demo",
    quiet: bool = False,
) -> dict[str, Any]:
    """Trains the `shapes` model from scratch and saves it to `output`.

    Args:
        output (`str` or `Path`): the diffusers folder to write.
        seed (`int`, defaults to 0): seeds the weights, the data stream and the noise.
        max_minutes (`float`, defaults to 60.0): wall-clock cap for all stages together; each gets
            its share of it by steps. A stage that hits its cap stops early (the run is then no
            longer reproducible, and a warning says so).
        config (`DemoConfig`, *optional*): architecture and settings; defaults to `DemoConfig()`.
        log_dir (`str`, *optional*, defaults to "runs/train-demo"): TensorBoard logs; `None` for none.
        quiet (`bool`, defaults to False): no progress lines.

    Returns:
        The training summary also written to `output/training.json` (settings, seconds per stage,
        held-out VAE PSNR, latent scaling factor).
    """
    config = config or DemoConfig()
    started = time.monotonic()
    budget = max_minutes * 60.0
    # A VAE step costs about one diffusion step (a little more with the locality loss): its share
    # of the budget by that estimate.
    denoiser_steps = config.diffusion_steps + config.refine_steps  # the UNet's two stages
    vae_share = 1.1 * config.vae_steps / max(1, 1.1 * config.vae_steps + denoiser_steps)

    pl.seed_everything(seed, workers=True, verbose=False)
    vae = build_vae(config)
    unet = build_unet(config)
    text_encoder = build_text_encoder(config)

    vae_stage = VAEStage(
        vae, config.vae_learning_rate, config.kl_weight, config.warmup_steps, config.vae_steps,
        config.locality_weight, config.locality_start,
    )
    trainer = _trainer("vae", config.vae_steps, budget * vae_share, config, log_dir, quiet)
    trainer.fit(
        vae_stage,
        train_dataloaders=_loader(
            config.vae_steps, config.vae_batch_size, config, seed, recoloured=config.locality_weight > 0
        ),
    )
    vae_steps_done = trainer.global_step
    vae_seconds = time.monotonic() - started
    vae = vae.eval().requires_grad_(False)
    scaling_factor = latent_scaling_factor(vae, config, seed)
    vae.register_to_config(scaling_factor=scaling_factor)
    vae_psnr = heldout_vae_psnr(vae, config)
    if not quiet:
        print(f"[vae] held-out PSNR {vae_psnr:.2f} dB, latent scaling factor {scaling_factor:.4f}", flush=True)

    tokenizer = clip_tokenizer()
    diffusion_stage = DiffusionStage(
        unet, text_encoder, vae, tokenizer, config.diffusion_learning_rate, config.uncond_probability,
        config.ema_decay, config.warmup_steps, config.diffusion_steps, config.grounding_weight,
        config.grounding_max_timestep, config.grounding_growth,
    )
    remaining = budget - (time.monotonic() - started)
    share = config.diffusion_steps / max(1, denoiser_steps)
    trainer = _trainer("diffusion", config.diffusion_steps, remaining * share, config, log_dir, quiet)
    trainer.fit(
        diffusion_stage,
        train_dataloaders=_loader(config.diffusion_steps, config.diffusion_batch_size, config, seed, recoloured=False),
    )
    diffusion_steps_done = trainer.global_step
    diffusion_stage.finish()
    diffusion_seconds = time.monotonic() - started - vae_seconds

    refine_steps_done = 0
    if config.refine_steps > 0:
        # Same losses from the averaged weights, the shape words held to the shape itself, on the
        # images after those the diffusion stage saw.
        refine_stage = DiffusionStage(
            unet, text_encoder, vae, tokenizer, config.refine_learning_rate, config.uncond_probability,
            config.ema_decay, config.warmup_steps // 2, config.refine_steps, config.refine_grounding_weight,
            config.grounding_max_timestep, config.refine_grounding_growth, ema_warmup=False,
        )
        remaining = budget - (time.monotonic() - started)
        trainer = _trainer("refine", config.refine_steps, remaining, config, log_dir, quiet)
        already_seen = config.diffusion_steps * config.diffusion_batch_size
        loader = _loader(
            config.refine_steps, config.diffusion_batch_size, config, seed, recoloured=False, start=already_seen
        )
        trainer.fit(refine_stage, train_dataloaders=loader)
        refine_steps_done = trainer.global_step
        refine_stage.finish()
    total_seconds = time.monotonic() - started

    done = (vae_steps_done, diffusion_steps_done, refine_steps_done)
    if any(
        steps < wanted for steps, wanted in zip(done, (config.vae_steps, config.diffusion_steps, config.refine_steps))
    ):
        warnings.warn(
            f"the {max_minutes} min cap stopped training early (VAE {vae_steps_done}/{config.vae_steps}, "
            f"diffusion {diffusion_steps_done}/{config.diffusion_steps}, refinement "
            f"{refine_steps_done}/{config.refine_steps} steps); the weights are not reproducible",
            stacklevel=2,
        )
    pipeline = assemble_pipeline(vae, unet.eval(), text_encoder.eval())
    save_fp16(pipeline, output)
    summary = {
        "seed": seed,
        "config": dataclasses.asdict(config),
        "vae_steps_done": vae_steps_done,
        "diffusion_steps_done": diffusion_steps_done,
        "refine_steps_done": refine_steps_done,
        "vae_seconds": round(vae_seconds, 1),
        "diffusion_seconds": round(diffusion_seconds, 1),
        "refine_seconds": round(total_seconds - vae_seconds - diffusion_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "latent_scaling_factor": scaling_factor,
        "heldout_vae_psnr": round(vae_psnr, 3),
        "parameters": {
            name: sum(p.numel() for p in getattr(pipeline, name).parameters())
            for name in ("vae", "unet", "text_encoder")
        },
    }
    (Path(output) / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(args: Optional[list[str]] = None) -> None:
    """`nti train-demo`: trains the `shapes` model (the arguments after "train-demo").

    Args:
        args (`list[str]`, *optional*): command-line arguments; defaults to `sys.argv[2:]`.
    """
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="nti train-demo", description="Train the small text-to-image 'shapes' model on procedural images."
    )
    parser.add_argument("--output", required=True, help="diffusers folder to write (fp16 safetensors)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data and noise (default 0)")
    parser.add_argument("--max-minutes", type=float, default=60.0, help="wall-clock cap of the whole run (default 60)")
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--diffusion-steps", type=int, default=defaults.diffusion_steps)
    parser.add_argument("--refine-steps", type=int, default=defaults.refine_steps)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--log-dir", default="runs/train-demo", help="TensorBoard log folder ('' for none)")
    parsed = parser.parse_args(args)
    if parsed.threads:
        torch.set_num_threads(parsed.threads)
    config = dataclasses.replace(
        defaults, vae_steps=parsed.vae_steps, diffusion_steps=parsed.diffusion_steps, refine_steps=parsed.refine_steps
    )
    summary = train_demo(parsed.output, parsed.seed, parsed.max_minutes, config, parsed.log_dir or None)
    print(json.dumps(summary, indent=2))
