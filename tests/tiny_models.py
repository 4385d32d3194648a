"""Tiny random-weight components of the real diffusers/transformers classes (diffusers' get_dummy_components idea).

They exercise every code path that a hub model (SD 2.1, SD-Turbo, SDXL) takes, in seconds on CPU. `bias_heads`
is the same idea for retrieval heads: real classes, weights set so that every output is known.
"""

import json
import string
from pathlib import Path

import numpy as np
import torch


def tiny_clip_tokenizer(folder: Path):
    """A CLIPTokenizer over single characters (no merges), written to `folder` and loaded back."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"]
    for ch in string.ascii_lowercase + string.digits + ",.'-":
        tokens += [ch, ch + "</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)


def _text_config(**kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=32, intermediate_size=37,
                          layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=100, **kw)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


def tiny_sd_pipeline(tmp: Path, sample_size: int = 32):
    """A StableDiffusionPipeline (SD 2.1 / SD-Turbo classes) with random weights, 2 x sample_size pixels square
    (64x64 by default; a smaller one where a test runs the UNet hundreds of times)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size,
                                in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config()),
                                   tokenizer=tiny_clip_tokenizer(tmp / "tok"), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_sdxl_pipeline(tmp: Path):
    """A StableDiffusionXLPipeline (SDXL / SDXL-Turbo classes) with random weights, 64x64 output."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=80, cross_attention_dim=64)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    config = _text_config(projection_dim=32)
    return StableDiffusionXLPipeline(vae=_vae(), text_encoder=CLIPTextModel(config),
                                     text_encoder_2=CLIPTextModelWithProjection(config),
                                     tokenizer=tiny_clip_tokenizer(tmp / "tok"),
                                     tokenizer_2=tiny_clip_tokenizer(tmp / "tok2"), unet=unet, scheduler=scheduler)


def tiny_sd3_pipeline(tmp: Path):
    """A StableDiffusion3Pipeline (SD 3.5 class) with random weights, 64x64 output.

    The T5 encoder is a 1-layer random T5EncoderModel read through the character CLIP tokenizer (a T5 tokenizer
    needs a sentencepiece file from the hub); the pipeline only calls the tokenizer, so the class does not matter.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=64, pooled_projection_dim=64, out_channels=4)
    config = _text_config(projection_dim=32)
    t5 = T5Config(vocab_size=100, d_model=64, d_kv=8, d_ff=37, num_layers=1, num_heads=4, pad_token_id=2,
                  eos_token_id=1, decoder_start_token_id=0)
    vae = _vae()
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5035)  # SD3's VAE latents are shifted and scaled
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=vae, text_encoder=CLIPTextModelWithProjection(config),
                                    tokenizer=tiny_clip_tokenizer(tmp / "tok"),
                                    text_encoder_2=CLIPTextModelWithProjection(config),
                                    tokenizer_2=tiny_clip_tokenizer(tmp / "tok2"),
                                    text_encoder_3=T5EncoderModel(t5), tokenizer_3=tiny_clip_tokenizer(tmp / "tok3"))


def bias_heads(path: Path, angle_deg: float) -> Path:
    """Retrieval heads saved to `path` whose outputs ignore the input: image -> (1, 0), text -> (cos a, sin a).

    Every image-text cosine is cos(angle_deg), so an alignment score is known before anything runs.
    """
    import retrieval

    heads = retrieval.build_heads(1280, 384, hidden=8, dim=2)
    a = np.deg2rad(angle_deg)
    with torch.no_grad():
        for kind, bias in (("image", [1.0, 0.0]), ("text", [np.cos(a), np.sin(a)])):
            heads[kind][-1].weight.zero_()
            heads[kind][-1].bias.copy_(torch.tensor(bias))
    retrieval.save_heads(path, heads, {"in_image": 1280, "in_text": 384, "hidden": 8, "dim": 2,
                                       "image_encoder": "efficientnet-lite0", "text_encoder": "all-MiniLM-L6-v2",
                                       "image_res": 128})
    return path
