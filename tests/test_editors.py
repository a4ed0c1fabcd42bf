"""MasaCtrl, Plug-and-Play and Pix2Pix-Zero (`editor=`), against plain loops written from their
authors' code (tests/reference_editors.py) on the SD-1.5-shaped model (SD 1.5's layer layout,
small channels, 64 px: the authors' layer indices mean there what they mean in SD) and on the tiny
model (indices mapped by their share), batches against singles, and their mistakes."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import build_independent_pipeline, random_image
from reference_editors import (
    build_sd15_shaped_pipeline,
    masactrl_sample,
    p2p_zero_edit,
    p2p_zero_invert,
    pnp_invert,
    pnp_reconstruct,
)
from reference_editors import pnp_sample as reference_pnp

import nti_lightning as nti
from nti_lightning.data.pie_bench import BenchSample
from nti_lightning.diffusion.ddim import DDIMSchedule
from nti_lightning.editing import Replace
from nti_lightning.editing.attention import by_share, self_attention_layers
from nti_lightning.editing.edit import EditJob, edit_jobs_latents, edit_latents
from nti_lightning.editing.editors import EDITOR_SETTINGS, editor_settings
from nti_lightning.editing.masactrl import MasaCtrl
from nti_lightning.editing.pie_bench import benchmark_edit
from nti_lightning.editing.pix2pix_zero import Pix2PixZero
from nti_lightning.editing.plug_and_play import PlugAndPlay, injection_blocks
from nti_lightning.inversion.methods.ddpm import image_seed
from nti_lightning.inversion.pivot import ddim_invert
from nti_lightning.models.text import PromptEncoder

T = 8
SOURCE, TARGET = "a red circle", "a blue square"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def sd15():
    return build_sd15_shaped_pipeline(seed=0, resolution=64)


def inverted(pipe, prompt: str, method: str, seed: int = 3, steps: int = T):
    image = random_image(seed, (pipe.vae.config.sample_size, pipe.vae.config.sample_size))
    [result] = nti.invert(pipe, image, prompt, num_inference_steps=steps, method=method, progress_bar=False)
    return result


@pytest.fixture(scope="module")
def sd15_inversions(sd15):
    """The SD-1.5-shaped model's inversions: DDIM and Direct of the source prompt and of "" (MasaCtrl's)."""
    pairs = [(method, prompt) for method in ("ddim", "direct") for prompt in (SOURCE, "")]
    return {(method, prompt): inverted(sd15, prompt, method) for method, prompt in pairs}


def test_the_layouts_of_the_sd15_shaped_model_are_sd15s(sd15):
    layers = self_attention_layers(sd15.unet)
    assert len(layers) == 16 and layers[6].startswith("mid_block") and layers[10].startswith("up_blocks.2.")
    block, attention = injection_blocks(sd15.unet)
    assert block == (1, 1)  # up_blocks[1].resnets[1], as the authors address it
    expected = [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]
    assert attention == [f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1.processor" for i, j in expected]


# ----------------------------------------------------------------------------------------------
# MasaCtrl


@pytest.mark.parametrize("method", ["ddim", "direct"])
@pytest.mark.parametrize("settings", [MasaCtrl(), MasaCtrl(start_step=0, start_layer=0)])
def test_masactrl_matches_the_authors_loop(sd15, sd15_inversions, method, settings):
    inversion = sd15_inversions[(method, "")]
    prompts = ["", TARGET]
    ours = edit_latents(sd15, inversion, prompts, editor=settings)
    steps = list(range(by_share(settings.start_step, 50, T), T))
    layers = list(range(settings.start_layer, 16))
    offsets = list(inversion.latent_offsets[:, None]) if inversion.latent_offsets is not None else None
    theirs = masactrl_sample(sd15, inversion.z_T[None], prompts, num_steps=T, step_idx=steps, layer_idx=layers,
                             noise_loss_list=offsets)
    assert relative(ours, theirs) < 1e-4
    plain = masactrl_sample(sd15, inversion.z_T[None], prompts, num_steps=T, step_idx=[], layer_idx=[],
                            noise_loss_list=offsets)
    assert relative(ours[1:], plain[1:]) > 1e-3  # the control moved the target, which the check would see


def test_masactrl_layers_in_the_models_own_numbering(independent_pipeline):
    """`layer_count` set to the model's own count gives its layers as they are (SDXL's 70 in the
    authors' SDXL script); 10 of 16 is 44 of 70."""
    assert by_share(10, 16, 70) == 44
    pipe = independent_pipeline
    inversion = inverted(pipe, "", "ddim", steps=6)
    ours = edit_latents(pipe, inversion, ["", TARGET], editor=MasaCtrl(start_step=0, start_layer=2, layer_count=4))
    theirs = masactrl_sample(pipe, inversion.z_T[None], ["", TARGET], num_steps=6, step_idx=range(0, 6),
                             layer_idx=[2, 3])
    assert relative(ours, theirs) < 1e-4


def test_masactrl_on_the_tiny_model_maps_the_layers_by_their_share(independent_pipeline):
    pipe = independent_pipeline
    assert len(self_attention_layers(pipe.unet)) == 4
    inversion = inverted(pipe, "", "ddim", steps=6)
    ours = edit_latents(pipe, inversion, ["", TARGET], editor="masactrl")
    # S = 4 of 50 is step 0 of 6, L = 10 of 16 layer 3 of 4.
    theirs = masactrl_sample(pipe, inversion.z_T[None], ["", TARGET], num_steps=6, step_idx=range(0, 6),
                             layer_idx=[3])
    assert relative(ours, theirs) < 1e-4


# ----------------------------------------------------------------------------------------------
# Plug-and-Play


@pytest.mark.parametrize("method", ["ddim", "direct"])
def test_pnp_matches_the_authors_loop_as_the_benchmark_feeds_it(sd15, sd15_inversions, method):
    inversion = sd15_inversions[(method, SOURCE)]
    inverted_x = pnp_invert(sd15, inversion.source_latent[None], SOURCE, num_steps=T)
    if method == "ddim":  # run_editing_pnp.py's DDIM row: the reconstruction at w = 1, one step ahead
        noisy = pnp_reconstruct(sd15, inverted_x[-1], SOURCE, num_steps=T)
        settings = PlugAndPlay(source_guidance_scale=1.0, source_offset=1)
    else:  # its Direct row: the inversion latents
        noisy = inverted_x
        settings = PlugAndPlay()
    ours = edit_latents(sd15, inversion, [SOURCE, TARGET], editor=settings)
    theirs = reference_pnp(sd15, noisy, TARGET, num_steps=T)
    assert relative(ours[1:], theirs) < 1e-4
    plain = reference_pnp(sd15, noisy, TARGET, num_steps=T, pnp_f_t=0.0, pnp_attn_t=0.0)
    assert relative(ours[1:], plain) > 1e-3


def test_pnp_on_the_tiny_model_injects_by_the_share_of_the_decoder(independent_pipeline):
    pipe = independent_pipeline
    assert injection_blocks(pipe.unet)[0] == (0, 1)
    inversion = inverted(pipe, SOURCE, "direct", steps=6)
    inverted_x = pnp_invert(pipe, inversion.source_latent[None], SOURCE, num_steps=6)
    ours = edit_latents(pipe, inversion, [SOURCE, TARGET], editor=PlugAndPlay(attention_steps=0.7))
    theirs = reference_pnp(pipe, inverted_x, TARGET, num_steps=6, pnp_attn_t=0.7, feature_block=(0, 1),
                           attention_blocks={0: [1]})
    assert relative(ours[1:], theirs) < 1e-4


# ----------------------------------------------------------------------------------------------
# Pix2Pix-Zero


@pytest.mark.parametrize("method", ["ddim", "direct"])
def test_pix2pix_zero_matches_the_authors_loop(sd15, sd15_inversions, method):
    inversion = sd15_inversions[(method, SOURCE)]
    latent_list = None
    if method == "direct":  # the inversion's trajectory, which the edit's offsets put the reference on
        latent_list = pnp_invert(sd15, inversion.source_latent[None], SOURCE, num_steps=T)
    ours = edit_latents(sd15, inversion, [SOURCE, TARGET], editor=Pix2PixZero())
    reconstruction, theirs = p2p_zero_edit(sd15, inversion.z_T[None], SOURCE, SOURCE, TARGET, num_steps=T,
                                           latent_list=latent_list)
    assert relative(ours[:1], reconstruction) < 1e-4
    assert relative(ours[1:], theirs) < 1e-4
    _, unguided = p2p_zero_edit(sd15, inversion.z_T[None], SOURCE, SOURCE, TARGET, num_steps=T, guidance_amount=0.0,
                                latent_list=latent_list)
    assert relative(theirs, unguided) > 1e-4  # the guidance moved the edit, which the check would see


def test_pix2pix_zero_takes_a_caption(independent_pipeline):
    pipe = independent_pipeline
    inversion = inverted(pipe, SOURCE, "ddim", steps=6)
    caption = "a photo of a red circle"
    ours = edit_latents(pipe, inversion, [SOURCE, TARGET], editor=Pix2PixZero(caption=caption, guidance_amount=0.5))
    reconstruction, theirs = p2p_zero_edit(pipe, inversion.z_T[None], caption, SOURCE, TARGET, num_steps=6,
                                           guidance_amount=0.5)
    assert relative(ours[1:], theirs) < 1e-4 and relative(ours[:1], reconstruction) < 1e-4


def test_pnp_and_pix2pix_zero_on_a_v_prediction_model_match_the_authors_loops():
    """SD 2.x's v-prediction: the authors' loops step with diffusers' scheduler, which converts v."""
    pipe = build_independent_pipeline(prediction_type="v_prediction")
    inversion = inverted(pipe, SOURCE, "direct", steps=6)
    # The inputs, the pivot latents (the authors' inversion loops read the output as ε: the package's
    # v-aware DDIM inversion gives them here); the loops under test are the edits.
    schedule = DDIMSchedule.from_scheduler_config(pipe.scheduler.config, 6)
    cond = PromptEncoder.of(pipe).encode([SOURCE])
    inverted_x = list(ddim_invert(pipe.unet, schedule, inversion.source_latent[None], cond).latents)
    ours = edit_latents(pipe, inversion, [SOURCE, TARGET], editor="pnp")
    theirs = reference_pnp(pipe, inverted_x, TARGET, num_steps=6, feature_block=(0, 1), attention_blocks={0: [1]})
    assert relative(ours[1:], theirs) < 1e-4
    ours = edit_latents(pipe, inversion, [SOURCE, TARGET], editor="p2p_zero")
    reconstruction, theirs = p2p_zero_edit(pipe, inversion.z_T[None], SOURCE, SOURCE, TARGET, num_steps=6,
                                           latent_list=inverted_x)
    assert relative(ours[1:], theirs) < 1e-4 and relative(ours[:1], reconstruction) < 1e-4


@pytest.mark.parametrize("retrace", [False, True])
def test_pix2pix_zeros_own_inversion_and_its_edits_match_the_authors_loops(sd15, retrace):
    """The benchmark's Pix2Pix-Zero rows: its regularised DDIM inversion, then the edit (its DDIM
    row), or the edit retracing that inversion's trajectory (its Direct row)."""
    image = random_image(3, (64, 64))
    [inversion] = nti.invert(sd15, image, SOURCE, num_inference_steps=T, method="pix2pix_zero", ids=["cat"],
                             progress_bar=False)
    random.seed(image_seed(0, "cat"))  # the shifts: the image's own generator, consumed in the same order
    latent_list = p2p_zero_invert(sd15, inversion.source_latent[None], SOURCE, num_steps=T)
    assert relative(inversion.z_T[None], latent_list[-1]) < 1e-5
    assert relative(inversion.pivot_latents, torch.cat(latent_list[:-1][::-1])) < 1e-5
    ours = edit_latents(sd15, inversion, [SOURCE, TARGET], editor=Pix2PixZero(retrace=retrace))
    reconstruction, theirs = p2p_zero_edit(sd15, latent_list[-1], SOURCE, SOURCE, TARGET, num_steps=T,
                                           latent_list=latent_list if retrace else None)
    assert relative(ours[1:], theirs) < 1e-4 and relative(ours[:1], reconstruction) < 1e-4
    plain = nti.invert(sd15, image, SOURCE, num_inference_steps=T, method="pix2pix_zero", progress_bar=False,
                       method_options={"lambda_ac": 0.0, "lambda_kl": 0.0})[0]
    assert relative(plain.z_T, inversion.z_T) > 1e-3  # the regularisation moved the inversion


# ----------------------------------------------------------------------------------------------
# Batches


@pytest.mark.parametrize("kind", ["masactrl", "pnp", "p2p_zero"])
def test_a_batch_of_edits_equals_each_edit_alone(independent_pipeline, kind):
    pipe = independent_pipeline
    direct, ddim = inverted(pipe, SOURCE, "direct", seed=4, steps=6), inverted(pipe, SOURCE, "ddim", seed=5, steps=6)
    settings = {
        "masactrl": [MasaCtrl(), MasaCtrl(start_step=20, start_layer=0)],
        "pnp": [PlugAndPlay(), PlugAndPlay(feature_steps=0.5, source_guidance_scale=1.0, source_offset=1)],
        "p2p_zero": [Pix2PixZero(), Pix2PixZero(guidance_amount=0.3)],
    }[kind]
    jobs = [
        EditJob(direct, [SOURCE, TARGET, "a green circle"], editor=settings[0]),
        EditJob(ddim, [SOURCE, "a red star"], editor=settings[1]),
    ]
    together = edit_jobs_latents(pipe, jobs)
    for job, latents in zip(jobs, together):
        alone = edit_latents(pipe, job.inversion, job.prompts, editor=job.editor)
        assert relative(latents, alone) < 1e-4  # a larger batch's rounding, amplified by the guided steps


def test_jobs_of_several_editors_are_sampled_each_with_its_own(independent_pipeline):
    pipe = independent_pipeline
    inversion = inverted(pipe, SOURCE, "direct", seed=4, steps=6)
    prompts = [SOURCE, TARGET]
    jobs = [
        EditJob(inversion, prompts, controller=Replace(prompts, pipe.tokenizer)),
        EditJob(inversion, prompts, editor=MasaCtrl()),
        EditJob(inversion, prompts, editor=Pix2PixZero()),
    ]
    together = edit_jobs_latents(pipe, jobs)
    assert relative(together[1], edit_latents(pipe, inversion, prompts, editor="masactrl")) < 1e-4
    assert relative(together[2], edit_latents(pipe, inversion, prompts, editor="p2p_zero")) < 1e-4
    replaced = edit_latents(pipe, inversion, prompts, controller=Replace(prompts, pipe.tokenizer))
    assert relative(together[0], replaced) < 1e-4


def test_the_source_row_retraces_the_direct_inversion_under_every_editor(independent_pipeline):
    pipe = independent_pipeline
    inversion = inverted(pipe, SOURCE, "direct", seed=4, steps=6)
    z0 = inversion.source_latent[None]
    # Plug-and-Play's and Pix2Pix-Zero's source branches are put on the pivot itself; MasaCtrl's
    # source row takes the offsets as a reconstruction does, with float rounding amplified by the
    # guided steps (a random model at w = 7.5 amplifies it most).
    for editor, bound in (("pnp", 1e-5), ("p2p_zero", 1e-5), ("masactrl", 5e-3)):
        latents = edit_latents(pipe, inversion, [SOURCE, TARGET], editor=editor)
        assert relative(latents[:1], z0) < bound, editor


# ----------------------------------------------------------------------------------------------
# Mistakes


@pytest.mark.parametrize(("name", "options", "culprit"), [
    ("masactrl", {"start_step": 51}, "start_step must be a whole number from 0 to 50"),
    ("masactrl", {"start_layer": -1}, "start_layer must be a whole number from 0 to 16"),
    ("masactrl", {"start_layer": 2.5}, "start_layer"),
    ("masactrl", {"layers": 3}, "unknown option(s) ['layers']"),
    ("masactrl", {"layer_count": 70, "start_layer": 71}, "start_layer must be a whole number from 0 to 70"),
    ("masactrl", {"layer_count": 0}, "layer_count must be a whole number >= 1"),
    ("pnp", {"feature_steps": 1.5}, "feature_steps must be a share"),
    ("pnp", {"source_offset": 2}, "source_offset must be 0 or 1"),
    ("p2p_zero", {"guidance_amount": -1}, "guidance_amount must be a number >= 0"),
    ("sdedit", {}, "unknown editor 'sdedit'"),
])
def test_bad_settings_are_refused_naming_them(name, options, culprit):
    with pytest.raises(ValueError, match=None) as error:
        editor_settings(name, options)
    assert culprit in str(error.value)


def test_edits_an_editor_cannot_make_are_refused_naming_why(independent_pipeline, independent_xl_pipeline):
    pipe = independent_pipeline
    inversion = inverted(pipe, SOURCE, "ddim", steps=6)
    with pytest.raises(ValueError, match="changes no word of the source"):
        edit_latents(pipe, inversion, [SOURCE, SOURCE], editor="p2p_zero")
    with pytest.raises(ValueError, match="need a target prompt"):
        edit_latents(pipe, inversion, [SOURCE], editor="pnp")
    with pytest.raises(ValueError, match="not both"):
        edit_latents(pipe, inversion, [SOURCE, TARGET], controller=Replace([SOURCE, TARGET], pipe.tokenizer),
                     editor="masactrl")
    with pytest.raises(ValueError, match="must be the inversion's source prompt"):
        edit_latents(pipe, inversion, ["", TARGET], editor="masactrl")
    [ddpm] = nti.invert(pipe, random_image(3), SOURCE, num_inference_steps=6, method="ddpm", progress_bar=False)
    with pytest.raises(ValueError, match="plain DDIM steps, which edit-friendly DDPM"):
        edit_latents(pipe, ddpm, [SOURCE, TARGET], editor="pnp")
    edit_latents(pipe, ddpm, [SOURCE, TARGET], editor="masactrl")  # an attention hook: any sampling rule
    [edict] = nti.invert(pipe, random_image(3), SOURCE, num_inference_steps=6, method="edict", progress_bar=False)
    with pytest.raises(ValueError, match="without an editor's control"):
        edit_latents(pipe, edict, [SOURCE, TARGET], editor="masactrl")
    xl = independent_xl_pipeline
    [xl_inversion] = nti.invert(xl, random_image(3), SOURCE, num_inference_steps=4, method="ddim", progress_bar=False)
    for editor in ("pnp", "p2p_zero"):
        with pytest.raises(ValueError, match="runs on SD 1.x and 2.x UNets.*this model is SDXL"):
            edit_latents(xl, xl_inversion, [SOURCE, TARGET], editor=editor)
    assert edit_latents(xl, xl_inversion, [SOURCE, TARGET], editor="masactrl").shape[0] == 2  # MasaCtrl runs on SDXL


@pytest.mark.parametrize(("editor", "method", "prompt", "options"), [
    ("masactrl", "ddim", "", {"start_step": 4, "start_layer": 10}),
    ("pnp", "ddim", SOURCE, {"source_guidance_scale": 1.0, "source_offset": 1}),
    ("pnp", "direct", SOURCE, {}),
    ("p2p_zero", "ddim", SOURCE, {"guidance_amount": 0.1, "retrace": False}),
    ("p2p_zero", "direct", SOURCE, {"guidance_amount": 0.1, "retrace": True}),
])
def test_each_editor_gives_its_benchmark_scripts_settings(editor, method, prompt, options):
    sample = BenchSample("1", "x.png", "x.png", SOURCE, TARGET, "", "1", None, [])
    spec = benchmark_edit(sample, "x.safetensors", editor=editor, method=method)
    assert spec["prompts"] == [prompt, TARGET] and spec["options"] == options and spec["editor"] == editor
    assert EDITOR_SETTINGS["p2p_zero"].benchmark_inversion(method) == "pix2pix_zero"
    assert EDITOR_SETTINGS["p2p_zero"].benchmark_inversion("null_text") == "null_text"
