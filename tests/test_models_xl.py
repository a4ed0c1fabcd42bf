"""SDXL models: the tiny SDXL-shaped pipeline, SDXL base's architecture, and loading SDXL pipelines."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from nti_lightning import load_pipeline
from nti_lightning.errors import ModelError
from nti_lightning.models.loading import (
    BUILTIN_MODELS,
    is_sdxl_checkpoint,
    single_file_model_type,
)
from nti_lightning.models.pipelines import cast_pipeline, is_sdxl, vae_stays_fp32
from nti_lightning.models.sdxl import (
    SDXL_PARAMETERS,
    SDXL_SCHEDULER_CONFIG,
    sdxl_random_pipeline,
    tiny_xl_pipeline,
)

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's ids for "a photo of a cat"


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pairs = list(zip(a.state_dict().items(), b.state_dict().items()))
    return len(pairs) == len(a.state_dict()) and all(n == m and torch.equal(p, q) for (n, p), (m, q) in pairs)


@pytest.fixture(scope="module")
def tiny_xl():
    return tiny_xl_pipeline(seed=0)


def test_tiny_xl_is_seeded_and_leaves_the_random_stream_alone(tiny_xl):
    state = torch.random.get_rng_state()
    again, other = tiny_xl_pipeline(seed=0), tiny_xl_pipeline(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert same_weights(getattr(tiny_xl, name), getattr(again, name)), name
        assert not same_weights(getattr(tiny_xl, name), getattr(other, name)), name


def test_tiny_xl_is_sdxl_shaped(tiny_xl):
    pipe = tiny_xl
    assert isinstance(pipe, StableDiffusionXLPipeline) and is_sdxl(pipe)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    widths = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == sum(widths)
    assert min(pipe.text_encoder.config.num_hidden_layers, pipe.text_encoder_2.config.num_hidden_layers) >= 2
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time" and unet.use_linear_projection
    assert unet.projection_class_embeddings_input_dim == (
        6 * unet.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    )
    assert list(unet.down_block_types) == ["CrossAttnDownBlock2D"] * 2
    assert list(unet.transformer_layers_per_block) == [1, 2]
    assert unet.sample_size * pipe.vae_scale_factor == pipe.vae.config.sample_size == 32
    assert pipe.vae.config.force_upcast and pipe.vae.config.scaling_factor == 0.13025
    assert pipe.config.force_zeros_for_empty_prompt and pipe.watermark is None
    assert not any(part.training for part in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2))
    # tokenizer pads with <|endoftext|>, tokenizer_2 with "!" (id 0), as SDXL's do.
    assert pipe.tokenizer("a photo of a cat").input_ids == pipe.tokenizer_2("a photo of a cat").input_ids == CAT_IDS
    assert pipe.tokenizer("a cat", padding="max_length").input_ids[3:6] == [49407, 49407, 49407]
    assert pipe.tokenizer_2("a cat", padding="max_length").input_ids[3:6] == [49407, 0, 0]
    assert len(pipe.tokenizer_2("a cat", padding="max_length").input_ids) == 77
    assert pipe.tokenizer_2.pad_token_id == 0


def test_tiny_xl_prompt_encoding_and_unet_call(tiny_xl):
    pipe = tiny_xl
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            "a cat", device="cpu", do_classifier_free_guidance=True
        )
        assert embeds.shape == (1, 77, pipe.unet.config.cross_attention_dim)
        assert pooled.shape == (1, pipe.text_encoder_2.config.projection_dim)
        # force_zeros_for_empty_prompt: no negative prompt means zero embeddings.
        assert not negative.any() and not negative_pooled.any() and embeds.any()
        time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2)
        noise = pipe.unet(
            torch.randn(2, 4, 8, 8),
            torch.tensor(981),
            encoder_hidden_states=torch.cat([negative, embeds]),
            added_cond_kwargs={"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": time_ids},
        ).sample
    assert noise.shape == (2, 4, 8, 8) and torch.isfinite(noise).all()


def test_load_tiny_xl_has_sds_ddim_schedule():
    pipe = load_pipeline("tiny-xl")
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.config._name_or_path == "tiny-xl"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    config = pipe.scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (config.steps_offset, config.timestep_spacing, config.clip_sample, config.set_alpha_to_one) == (
        1, "leading", False, False
    )
    pipe.scheduler.set_timesteps(50)
    assert pipe.scheduler.timesteps.tolist() == list(range(981, 0, -20))
    sd = load_pipeline("tiny").scheduler
    sd.set_timesteps(50)
    assert torch.equal(sd.timesteps, pipe.scheduler.timesteps)
    assert torch.equal(sd.alphas_cumprod, pipe.scheduler.alphas_cumprod)
    assert "tiny-xl" in BUILTIN_MODELS and "sdxl-random" in BUILTIN_MODELS


def test_fp16_keeps_an_sdxl_vae_in_fp32_only():
    pipe = load_pipeline("tiny-xl", torch_dtype=torch.float16)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.float16
    assert pipe.vae.dtype == torch.float32
    assert load_pipeline("tiny-xl", torch_dtype=torch.bfloat16).vae.dtype == torch.bfloat16
    assert load_pipeline("tiny", torch_dtype=torch.float16).vae.dtype == torch.float16  # SD: unchanged
    pipe.vae.register_to_config(force_upcast=False)  # an fp16-safe VAE
    assert not vae_stays_fp32(pipe, torch.float16)
    assert cast_pipeline(pipe, torch.float16).vae.dtype == torch.float16


def test_sdxl_folder_round_trip(tiny_xl, tmp_path):
    folder = tmp_path / "xl"
    tiny_xl.save_pretrained(folder)
    loaded = load_pipeline(str(folder))
    assert isinstance(loaded, StableDiffusionXLPipeline) and loaded.config.force_zeros_for_empty_prompt
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert same_weights(getattr(tiny_xl, name), getattr(loaded, name)), name
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert loaded.tokenizer_2("a cat", padding="max_length").input_ids[3:5] == [49407, 0]

    # fp16: the VAE is read in fp32 (the very weights), the rest in fp16.
    half = load_pipeline(str(folder), torch_dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32
    assert same_weights(tiny_xl.vae, half.vae)
    # An fp16-safe VAE (force_upcast false, like sdxl-vae-fp16-fix) is loaded in fp16.
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**vae_config, "force_upcast": False}))
    assert load_pipeline(str(folder), torch_dtype=torch.float16).vae.dtype == torch.float16

    # Without tokenizer folders, both tokenizers are rebuilt offline, tokenizer_2 padding with "!".
    shutil.rmtree(folder / "tokenizer")
    shutil.rmtree(folder / "tokenizer_2")
    bare = load_pipeline(str(folder))
    assert isinstance(bare, StableDiffusionXLPipeline)
    assert bare.tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert bare.tokenizer("a cat", padding="max_length").input_ids[3:5] == [49407, 49407]
    assert bare.tokenizer_2("a cat", padding="max_length").input_ids[3:5] == [49407, 0]
    assert bare.tokenizer.model_max_length == bare.tokenizer_2.model_max_length == 77


def test_sd_folder_still_loads_as_sd(tmp_path):
    load_pipeline("tiny").save_pretrained(tmp_path / "sd")
    loaded = load_pipeline(str(tmp_path / "sd"))
    assert type(loaded) is StableDiffusionPipeline and not is_sdxl(loaded)
    assert load_pipeline(str(tmp_path / "sd"), torch_dtype=torch.float16).vae.dtype == torch.float16


def test_single_file_checkpoints_are_told_apart_by_their_header(tmp_path):
    def small():  # one tensor per name: safetensors refuses shared storage
        return torch.zeros(2)

    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}
    sdxl = {
        **unet,
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": small(),
        "conditioner.embedders.1.model.positional_embedding": small(),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": small(),
    }
    sd15 = {
        **unet,
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": small(),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": small(),
    }
    refiner = {**unet, "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": small()}
    for name, tensors in {"sdxl": sdxl, "sd15": sd15, "refiner": refiner}.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
    assert single_file_model_type(tmp_path / "sdxl.safetensors") == "xl_base"
    assert is_sdxl_checkpoint(tmp_path / "sdxl.safetensors")
    assert single_file_model_type(tmp_path / "sd15.safetensors") == "v1"
    assert not is_sdxl_checkpoint(tmp_path / "sd15.safetensors")
    assert is_sdxl_checkpoint(tmp_path / "refiner.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ModelError, match="broken.safetensors: not a readable .safetensors checkpoint"):
        load_pipeline(str(tmp_path / "broken.safetensors"))


def test_sdxl_random_has_sdxl_bases_parameter_counts():
    pipe = sdxl_random_pipeline(device="meta")
    assert SDXL_PARAMETERS == {
        "unet": 2_567_463_684,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
        "vae": 83_653_863,
    }
    for name, expected in SDXL_PARAMETERS.items():
        part = getattr(pipe, name)
        assert all(p.device.type == "meta" for p in part.parameters()), name
        assert count(part) == expected, name
    assert pipe.unet.config.sample_size == 128 and pipe.vae.config.sample_size == 1024
    assert pipe.text_encoder_2.config.projection_dim == 1280 and pipe.text_encoder_2.config.hidden_act == "gelu"
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    assert {k: pipe.scheduler.config[k] for k in SDXL_SCHEDULER_CONFIG} == SDXL_SCHEDULER_CONFIG


def test_sdxl_random_dtype_resolution_and_shapes_fit():
    state = torch.random.get_rng_state()
    pipe = sdxl_random_pipeline(seed=3, device="meta", torch_dtype=torch.float16, resolution=256)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert pipe.unet.dtype == pipe.text_encoder_2.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    assert pipe.unet.config.sample_size == 32 and pipe.vae.config.sample_size == 256
    assert count(pipe.unet) == SDXL_PARAMETERS["unet"]
    with pytest.raises(ValueError, match="multiple of 8"):
        sdxl_random_pipeline(device="meta", resolution=100)
    with torch.no_grad():
        ids = torch.zeros(2, 77, dtype=torch.long, device="meta")
        first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        second = pipe.text_encoder_2(ids, output_hidden_states=True)
        text = torch.cat([first, second.hidden_states[-2]], dim=-1)
        cond = {"text_embeds": second.text_embeds, "time_ids": torch.zeros(2, 6, device="meta")}
        latents = torch.empty(2, 4, 32, 32, device="meta", dtype=torch.float16)
        noise = pipe.unet(latents, torch.tensor(981, device="meta"), encoder_hidden_states=text, added_cond_kwargs=cond)
    assert text.shape == (2, 77, 2048) and second.text_embeds.shape == (2, 1280)
    assert noise.sample.shape == (2, 4, 32, 32)


def test_sdxl_checkpoints_and_hub_ids_get_the_sdxl_class(tiny_xl, tmp_path, monkeypatch):
    """Which class and keywords loading picks (the real loads need the hub's configs: faked here)."""
    calls = []

    def fake_loader(cls, pretrained, **kwargs):
        calls.append((cls, pretrained, kwargs))
        fake = tiny_xl_pipeline(seed=0) if cls is StableDiffusionXLPipeline else load_pipeline("tiny")
        return fake.to(dtype=kwargs["dtype"]) if isinstance(kwargs.get("dtype"), torch.dtype) else fake

    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        for method in ("from_single_file", "from_pretrained"):
            monkeypatch.setattr(cls, method, classmethod(fake_loader))
    xl_keys = {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2)}
    save_file(xl_keys, tmp_path / "xl.safetensors")
    sd_keys = {"model.diffusion_model.output_blocks.11.0.skip_connection.weight": torch.zeros(2)}
    save_file(sd_keys, tmp_path / "sd.safetensors")

    # A single file is read in one dtype; the SDXL VAE is put back in fp32 afterwards.
    pipe = load_pipeline(str(tmp_path / "xl.safetensors"), torch_dtype=torch.float16)
    assert calls[-1][0] is StableDiffusionXLPipeline
    assert calls[-1][2] == {"add_watermarker": False, "dtype": torch.float16}
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    assert type(load_pipeline(str(tmp_path / "sd.safetensors"))) is StableDiffusionPipeline
    assert calls[-1][2] == {"safety_checker": None, "requires_safety_checker": False}

    # A hub id: the class comes from its model_index.json; fp16 SDXL reads the VAE in fp32.
    index = {"_class_name": "StableDiffusionXLPipeline"}
    monkeypatch.setattr("diffusers.DiffusionPipeline.load_config", lambda repo_id, **kwargs: index)
    pipe = load_pipeline("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16)
    assert calls[-1][:2] == (StableDiffusionXLPipeline, "stabilityai/stable-diffusion-xl-base-1.0")
    assert calls[-1][2]["dtype"] == {"default": torch.float16, "vae": torch.float32}
    assert isinstance(pipe, StableDiffusionXLPipeline) and type(pipe.scheduler).__name__ == "DDIMScheduler"
    index["_class_name"] = "StableDiffusionPipeline"
    assert type(load_pipeline("CompVis/stable-diffusion-v1-4")) is StableDiffusionPipeline
