"""The `sd15-random` model has Stable Diffusion 1.5's architecture (checked on the meta device: no weights)."""

import torch

from nti_lightning.models import vae as vae_codec
from nti_lightning.models.loading import BUILTIN_MODELS
from nti_lightning.models.sd15 import sd15_random_pipeline

# Parameter counts of stable-diffusion-v1-5's unet, vae and text_encoder.
SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_equal_stable_diffusion_1_5():
    pipe = sd15_random_pipeline(device="meta")
    for name, expected in SD15_PARAMETERS.items():
        part = getattr(pipe, name)
        assert all(p.device.type == "meta" for p in part.parameters()), name
        assert count(part) == expected, name


def test_shapes_tokenizer_and_scheduler_are_sd_1_5s():
    pipe = sd15_random_pipeline(device="meta", torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    assert vae_codec.resolution(pipe.vae, pipe.unet.config.sample_size) == 512
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 768
    assert pipe.vae.config.scaling_factor == 0.18215
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    config = pipe.scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_components_fit_together_at_sd_1_5s_shapes():
    pipe = sd15_random_pipeline(device="meta")
    with torch.no_grad():
        text = pipe.text_encoder(torch.zeros(2, 77, dtype=torch.long, device="meta"))[0]
        latents = pipe.vae.encode(torch.empty(2, 3, 512, 512, device="meta")).latent_dist.mean
        noise = pipe.unet(latents, torch.tensor(981, device="meta"), encoder_hidden_states=text).sample
    assert text.shape == (2, 77, 768) and latents.shape == noise.shape == (2, 4, 64, 64)


def test_building_leaves_the_random_stream_alone_and_is_registered():
    state = torch.random.get_rng_state()
    sd15_random_pipeline(seed=3, device="meta")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert "sd15-random" in BUILTIN_MODELS
