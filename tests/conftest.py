"""Shared fixtures: small models and images.

`independent_pipeline` is a seeded SD-shaped pipeline built here from diffusers/transformers
classes with a configuration unlike the package's own `tiny` model, so the comparison with the
reference does not rest on anything the package builds.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from nti_lightning.models.tokenizer import clip_tokenizer

# Two threads (this project's CI machine has two cores) unless OMP_NUM_THREADS says otherwise: the
# suite is run with 1 and 2 to check that no test leans on one thread count's rounding.
THREADS = int(os.environ.get("OMP_NUM_THREADS") or 2)
torch.set_num_threads(THREADS)


def independent_vae(**config) -> AutoencoderKL:
    """The independent pipelines' 2-level VAE (16 px <-> 8x8 latents); `config` adds settings."""
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        **config,
    )


def independent_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """Stable Diffusion's DDIM scheduler settings (scaled-linear betas, steps offset 1)."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type,
    )


def build_independent_pipeline(seed: int = 1234, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = independent_vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )
    )
    scheduler = independent_scheduler(prediction_type)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer(), unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def independent_pipeline() -> StableDiffusionPipeline:
    return build_independent_pipeline()


def random_image(seed: int, size: tuple[int, int] = (20, 16)) -> Image.Image:
    """A smooth random colour image (non-square, so the centre crop is exercised)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture
def images() -> list[Image.Image]:
    return [random_image(seed) for seed in range(3)]


def write_dataset(folder: Path, count: int, size: tuple[int, int] = (24, 20), first_seed: int = 100) -> Path:
    """`count` random images (seeds `first_seed + i`) and a JSONL manifest of them in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        random_image(first_seed + i, size).save(folder / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "prompt": f"a photo of thing {i}"})
    manifest = folder / "dataset.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest



def build_independent_xl_pipeline(seed: int = 4321) -> StableDiffusionXLPipeline:
    """A seeded SDXL-shaped pipeline: two text encoders (the second with a projection and a "!"
    pad token, id 0, as SDXL's), a `text_time` UNet with cross-attention at both levels, a
    2-level VAE (16 px -> 8x8 latents) with SDXL's scaling factor, and `force_zeros_for_empty_prompt`.

    The text encoders are initialised at half scale (`initializer_factor=0.5`): at full scale the
    random condition dominates the tiny UNet's output against SDXL's zero null, and guided sampling
    at w = 7.5 runs far off.
    """
    width_1, width_2, projection_dim, time_dim = 16, 24, 20, 8
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=width_1, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
            initializer_factor=0.5,
        )
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=width_2, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
            projection_dim=projection_dim, initializer_factor=0.5,
        )
    )
    tokenizer_2 = clip_tokenizer()
    tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!" (id 0)
    assert tokenizer_2.pad_token_id == 0
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=width_1 + width_2,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection_dim,
        norm_num_groups=4,
    )
    vae = independent_vae(scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE settings
    scheduler = independent_scheduler()
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
        tokenizer=clip_tokenizer(), tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=scheduler,
        image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def independent_xl_pipeline() -> StableDiffusionXLPipeline:
    return build_independent_xl_pipeline()


ROOT = Path(__file__).resolve().parents[1]


def run_quietly(command: list[str], cwd: Path, threads: int = 1) -> subprocess.CompletedProcess:
    """Runs `command` (e.g. `nti fit` in a subprocess) and asserts it succeeded; its output is returned."""
    # Equal thread counts per process: CPU kernels round differently with other thread counts.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@contextmanager
def running_quietly(
    command: list[str], cwd: Path, threads: int = 1
) -> Iterator[Callable[[], subprocess.CompletedProcess]]:
    """`run_quietly` started in the background, for other work meanwhile (a multi-process run spends
    seconds importing before it computes): yields a function that waits for the command, asserts it
    succeeded and returns its output. A command still running when the block ends (the work meanwhile
    failed) is killed with the processes it started."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True,
                                   start_new_session=True)

        def result() -> subprocess.CompletedProcess:
            process.wait(timeout=600)
            stdout.seek(0)
            stderr.seek(0)
            done = subprocess.CompletedProcess(command, process.returncode, stdout.read(), stderr.read())
            assert done.returncode == 0, done.stderr[-3000:]
            return done

        try:
            yield result
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def run_in_process(args: list[str], cwd: Path, threads: int = 1) -> subprocess.CompletedProcess:
    """`nti ARGS` (`main([...])`) in this process from `cwd`, as `run_quietly` runs `nti` in a
    subprocess, without a fresh interpreter's imports: asserts it succeeded and returns its output.
    torch runs on `threads` threads meanwhile (a comparison with the processes of a multi-process
    run, each on one thread, needs the same count), then on as many as before."""
    from nti_lightning.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    threads_before, cwd_before = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(threads)
    os.chdir(cwd)
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                main(list(args))
                status = 0
            except SystemExit as exit_:
                status = exit_.code or 0
    finally:
        os.chdir(cwd_before)
        torch.set_num_threads(threads_before)
    assert status == 0, stderr.getvalue()[-3000:]
    return subprocess.CompletedProcess(["nti", *args], status, stdout.getvalue(), stderr.getvalue())


class OneProcessFit:
    """`nti fit` of tests/configs/tiny.yaml on `write_dataset`'s five images (`manifest`), B = 2, in
    one process on one thread: what the multi-process runs (tests/test_dataset.py,
    tests/test_multi_node.py) must give. `self(scheduling)` runs it in this process the first time
    and returns its output folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.manifest = write_dataset(folder / "data", 5)
        self.outputs: dict[str, Path] = {}

    def __call__(self, scheduling: str) -> Path:
        if scheduling not in self.outputs:
            run_in_process(
                ["fit", "--config", str(ROOT / "tests" / "configs" / "tiny.yaml"), "--trainer.logger", "false",
                 "--data.manifest", str(self.manifest), "--data.batch_size", "2", "--trainer.accelerator", "cpu",
                 "--model.scheduling", scheduling, "--model.output_dir", str(self.folder / scheduling)],
                self.folder,
            )
            self.outputs[scheduling] = self.folder / scheduling
        return self.outputs[scheduling]


@pytest.fixture(scope="session")
def one_process_fit(tmp_path_factory) -> OneProcessFit:
    """The session's `OneProcessFit`: each scheduling's run is made once."""
    return OneProcessFit(tmp_path_factory.mktemp("one_process"))


#: The `nti` console script of this environment (or `main` where it is not installed).
NTI = Path(sys.executable).with_name("nti")
COMMAND = [str(NTI)] if NTI.exists() else [sys.executable, "-c", "from nti_lightning.cli import main; main()"]


def nti(*args: str, cwd: Path, debug: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """`nti ARGS` as a user runs it, in its own process, with the hub offline and without NTI_DEBUG
    unless `debug`; its status and output are returned, not checked."""
    env = {key: value for key, value in os.environ.items() if key != "NTI_DEBUG"}
    env["HF_HUB_OFFLINE"] = "1"  # a hub id must fail at once, not wait for a network there is none of
    if debug:
        env["NTI_DEBUG"] = "1"
    return subprocess.run([*COMMAND, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def demo_commands(tmp_path_factory) -> SimpleNamespace:
    """The README's demo commands, run once as a user runs them in a clean folder (the console
    script, in its own process): `nti fit --config configs/demo.yaml`, then `nti predict --config
    configs/edit_demo.yaml` on the artifact it wrote. `folder` holds what they wrote; `fitted` and
    `edited` are their `subprocess.CompletedProcess`. Shared by the tests of their notices
    (test_cli_errors.py) and of their results (test_shapes_model.py)."""
    folder = tmp_path_factory.mktemp("demo")
    shutil.copytree(ROOT / "configs" / "images", folder / "configs" / "images")
    fitted = nti("fit", "--config", str(ROOT / "configs" / "demo.yaml"), cwd=folder)
    edited = nti("predict", "--config", str(ROOT / "configs" / "edit_demo.yaml"), cwd=folder)
    return SimpleNamespace(folder=folder, fitted=fitted, edited=edited)


@pytest.fixture
def nti_main(monkeypatch, capfd):
    """`nti ARGS` run in this process from `cwd`: `main([...])`'s exit status with its stdout and
    stderr, as a `subprocess.CompletedProcess` (what `nti(...)` returns, without ~10 s of imports)."""
    import huggingface_hub.constants

    monkeypatch.delenv("NTI_DEBUG", raising=False)
    # A hub id must fail at once, not wait for a network there is none of; the hub reads the
    # variable at import, so its flag is set as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        from nti_lightning.cli import main

        capfd.readouterr()
        try:
            main(list(args))
            status = 0
        except SystemExit as exit_:
            status = 0 if exit_.code is None else exit_.code
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(["nti", *args], status, out, err)

    return run
