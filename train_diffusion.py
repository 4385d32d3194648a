"""Train a small text-to-image latent diffusion model from scratch on captioned images (COCO-style captions).

Question answered: can a tiny Stable-Diffusion-shaped model (tokenizer, CLIP text encoder, KL autoencoder,
conditional UNet), trained on CPU in about an hour, draw the shapes world from its captions: shape, colour,
size, position and relations? The result is saved so that
`StableDiffusionPipeline.from_pretrained(OUT)` restores everything, tokenizer included, as for sd-turbo.

Stages (each resumable; the checkpoint folder keeps what is finished):
    1. tokenizer: a word-level BPE (CLIP format, `</w>` suffix) trained on the captions
    2. AutoencoderKL (64 px -> 16x16x4 latents), object-weighted L1 + MSE + small KL; PSNR on held-out images
    3. latents of every training image, encoded once (posterior mean and std; one sample drawn per step)
    4. CLIPTextModel + UNet2DConditionModel trained jointly (DDPM noise, v-prediction, min-SNR weighting, 10% empty
       captions for classifier-free guidance, EMA weights, AdamW with warmup + cosine)
    5. StableDiffusionPipeline with a DPM-Solver++ sampler, EMA weights in fp16, model card, training log

Commands:
    python train_diffusion.py --quick --split train --out /tmp/sd-quick       # smoke run, < 60 s on CPU
    python train_diffusion.py --threads 1 --vae-minutes 10 --max-minutes 70  # the shipped model (~70 min CPU)
    python train_diffusion.py --threads 1 --decoder-minutes 48                # optional, beside the run above
                                                                              # once its latents exist
    python train_diffusion.py study --run-name R --designs A,B --cpu-minutes 30 --eval-at 10,30  # design study
    python train_diffusion.py ceiling --vae FOLDER[,FOLDER]  # an autoencoder's representation ceiling
    python train_diffusion.py curve --ckpt-dir DIR           # score a run's snapshots: its learning curve
    python train_diffusion.py caption-use --model NAME[,NAME]  # does the UNet read the caption, and by which path
Run the same command again to resume from the latest checkpoint; Ctrl-C saves one before exiting. On a
machine whose cores are shared with other jobs, --threads 1 is several times faster than 2 (no OpenMP
stalls). models/shapes-sd-tiny was made by the second command (stopped after the latents and restarted
with --max-minutes 58) with the third running beside it; see its training_log.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import math
import os
import re
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fidelity import round_trip, vae_round_trip
from utils import (DEFAULT_DATA, REPO, UserError, apply_preset, apply_quick, check, cli, comma_list, common_args,
                   fmt, fmt_ci, fmt_est, generate_images, git_commit, image_grid, library_versions, load_data,
                   md_table, model_card, parse_checked, pick_device, pick_dtype, read_json, repo_path, set_seed,
                   set_threads, start_run, write_json, write_text)

DEFAULT_OUT = REPO / "models" / "shapes-sd-tiny"
CHECKPOINTS = REPO / "checkpoints"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Prompts drawn into every samples grid: single objects (shape, colour, size, position) and relations.
SAMPLE_PROMPTS = (
    "a small red star",
    "a large blue hexagon",
    "a green circle in the top left",
    "a small yellow triangle in the bottom right",
    "a red star to the left of a small blue circle",
    "a purple heart above an orange square",
    "a large cyan ring in the center",
    "a pink arrow below a green cross",
)
# Designs compared by `python train_diffusion.py study` (each a set of flag defaults; explicit flags win).
# Sizes come from the measured cost per UNet step (issue 10, fact 3): 16x16x4 latents with attention at the two
# lower levels cost 0.42 s per batch-32 step on 2 cores; 32x32x4 with attention only at 8x8 and 4x4, 0.71 s.
F2 = dict(vae_channels="16,32", latent_channels=4, unet_channels="32,64,96,128", attn_levels=2, object_weight=0.0)
DESIGNS = {
    "latent-f4": dict(vae_channels="16,32,64", latent_channels=4, unet_channels="32,64,96", attn_levels=2,
                      object_weight=0.0),
    "latent-f2": F2,
    "latent-f2-objw": {**F2, "object_weight": 10.0},
    "latent-f2-shift": {**F2, "snr_shift": 4.0},
    "latent-f2-objw-shift": {**F2, "object_weight": 10.0, "snr_shift": 4.0},
    "latent-f2-vloss": {**F2, "snr_gamma": 0.0, "attn_head_dim": 4},
    "latent-f2-vloss-shift": {**F2, "snr_gamma": 0.0, "attn_head_dim": 4, "snr_shift": 4.0},
    "latent-f2-film": {**F2, "snr_gamma": 0.0, "attn_head_dim": 4, "snr_shift": 4.0, "text_film": True},
    "latent-f2-film-text": {**F2, "snr_gamma": 0.0, "attn_head_dim": 4, "snr_shift": 4.0, "text_film": True,
                            "init_text": str(REPO / "models" / "shapes-sd-tiny"), "freeze_text": True},
}
DESIGNS["latent-f2-film-text-zsnr"] = {**DESIGNS["latent-f2-film-text"], "zero_terminal_snr": True}
DESIGN_NOTES = {
    "latent-f4": "today's model: f=4 AutoencoderKL (64 px -> 16x16x4), plain min-SNR v-loss",
    "latent-f2": "f=2 AutoencoderKL (64 px -> 32x32x4): objects of 11-19 px stay 6-10 latent pixels wide",
    "latent-f2-objw": "f=2 as above, and the diffusion loss inside the (dilated) object boxes weighted 11x, "
                      "normalised per image, so the objects (~5% of the pixels) get the capacity",
    "latent-f2-shift": "f=2 with the noise schedule's SNR divided by 4 at every timestep: 32x32 latents keep 4x the "
                       "signal of 16x16 ones at equal noise, so the unshifted model learns the layout (and the text "
                       "that decides it) only from the few noisiest timesteps",
    "latent-f2-objw-shift": "f=2, object-weighted loss (11x) and the SNR/4 schedule together",
    "latent-f2-vloss": "f=2 with the plain v-prediction MSE instead of min-SNR-5: min-SNR weights a v-loss by "
                       "min(SNR, 5) / (SNR + 1), ~SNR at the noisy timesteps that decide the layout, and the f=2 "
                       "UNets trained with it drew empty backgrounds; heads of 4 channels",
    "latent-f2-vloss-shift": "the plain v-loss and the SNR/4 schedule together (more of the training at the noisy "
                             "timesteps, now at full weight); heads of 4 channels",
    "latent-f2-film": "latent-f2-vloss-shift, and the caption also enters every resnet block: attention-pooled, "
                      "added to the timestep embedding, applied as scale and shift (diffusers' "
                      "addition_embed_type='text', resnet_time_scale_shift='scale_shift'), not only through "
                      "cross-attention at 8x8 and 4x4",
    "latent-f2-film-text": "latent-f2-film with the text encoder (and tokenizer) of models/shapes-sd-tiny, frozen: "
                           "features that already tell the caption's words apart, learned by the f=4 model's own "
                           "training (a head start its CPU-minutes do not count)",
    "latent-f2-film-text-zsnr": "latent-f2-film-text with zero terminal SNR (Lin et al. 2024): the linear betas leave "
                                "alpha_bar_T > 0, so the UNet reads the low frequencies of a sampler's starting "
                                "noise as signal and the seed, not the caption, might decide where objects go; at "
                                "SNR 0 the noisiest step must place them from the caption alone (measured at step "
                                "~2,200: place still at chance, README)",
}
# Settings in a checkpoint folder that a resume must match (weights of another shape cannot be loaded).
ARCH_KEYS = ("vae_channels", "latent_channels", "text_hidden", "text_layers", "text_heads", "unet_channels",
             "unet_layers", "attn_head_dim", "attn_levels", "prediction_type", "snr_shift", "text_film",
             "freeze_text", "zero_terminal_snr")
# What a checkpoint made before a key existed was trained with.
ARCH_DEFAULTS = {"snr_shift": 1.0, "text_film": False, "freeze_text": False, "zero_terminal_snr": False}
QUICK = dict(max_images=64, vae_channels="8,16", vae_crop=0, vae_steps=4, vae_batch_size=8, text_hidden=32,
             text_layers=1, text_heads=2, unet_channels="32,64", unet_layers=1, attn_head_dim=8, max_steps=4,
             batch_size=8, warmup_steps=1, ckpt_every=2, sample_every=0, sample_steps=2, eval_images=16, threads=1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("data and folders")
    io.add_argument("--data", type=Path, nargs="+", default=[DEFAULT_DATA],
                    help="one or more data.pkl files from generate_data.py (their --split images are pooled)")
    io.add_argument("--split", default="pretrain", help="split to train on, e.g. pretrain or train")
    io.add_argument("--eval-split", default="val",
                    help="split of the first --data file for the autoencoder's held-out PSNR (e.g. val, test)")
    io.add_argument("--max-images", type=int, default=0, help="use at most this many training images (0: all)")
    io.add_argument("--resolution", type=int, default=0,
                    help="resize each image's shorter side to this many pixels and centre-crop it square (a "
                         "multiple of 8; 0: keep the data's size, which must then be one square size, as the shapes "
                         "world's is); real COCO photos come in many sizes")
    io.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"pipeline folder to write (default {DEFAULT_OUT})")
    io.add_argument("--ckpt-dir", type=Path, default=None,
                    help="checkpoint folder (default: checkpoints/<name of --out>); resumed when it exists")
    io.add_argument("--fresh", action="store_true", help="delete --ckpt-dir first instead of resuming")
    vae = parser.add_argument_group("autoencoder")
    vae.add_argument("--vae-channels", default="16,32,64",
                     help="AutoencoderKL block widths, comma-separated; k blocks downsample by 2^(k-1)")
    vae.add_argument("--latent-channels", type=int, default=4, help="latent channels (>= 1)")
    vae.add_argument("--vae-steps", type=int, default=700, help="autoencoder optimiser steps (> 0)")
    vae.add_argument("--vae-crop", type=int, default=0,
                     help="autoencoder trains on random square crops of this side in pixels, a multiple of 8 "
                          "(fully convolutional, so 4x cheaper at 32 than at 64; 0: whole images)")
    vae.add_argument("--vae-batch-size", type=int, default=16, help="autoencoder images per step (> 0)")
    vae.add_argument("--vae-lr", type=float, default=2e-3, help="autoencoder AdamW learning rate (> 0)")
    vae.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the KL term against L1 (>= 0)")
    vae.add_argument("--vae-minutes", type=float, default=0,
                     help="stop the autoencoder stage after this many minutes (0: only --vae-steps)")
    vae.add_argument("--init-vae", type=Path, default=None,
                     help="start from this trained AutoencoderKL folder instead of training one (e.g. "
                          "models/shapes-vae-f2, the 4,000-step f=2 autoencoder); its block widths and latent "
                          "channels must match --vae-channels and --latent-channels (a --design sets them)")
    vae.add_argument("--decoder-minutes", type=float, default=0,
                     help="instead of the usual run: fine-tune only the finished autoencoder's decoder for this many "
                          "minutes, then exit. The encoder stays frozen, so the latents (and a UNet training on "
                          "them in another process) stay valid; the final save reads the updated decoder")
    net = parser.add_argument_group("text encoder and UNet")
    net.add_argument("--text-hidden", type=int, default=128,
                     help="CLIP text encoder width (= UNet cross-attention dim)")
    net.add_argument("--text-layers", type=int, default=2, help="CLIP text encoder layers (>= 1)")
    net.add_argument("--text-heads", type=int, default=4, help="CLIP attention heads (must divide --text-hidden)")
    net.add_argument("--unet-channels", default="32,64,96",
                     help="UNet block widths, comma-separated, one per resolution level; the first level is "
                          "convolution only, the others have self- and cross-attention")
    net.add_argument("--unet-layers", type=int, default=1, help="UNet resnet layers per block (>= 1)")
    net.add_argument("--attn-head-dim", type=int, default=32, help="UNet attention head size (divides each width)")
    net.add_argument("--attn-levels", type=int, default=0,
                     help="UNet levels, counted from the lowest resolution, with self- and cross-attention "
                          "(0: every level but the first)")
    net.add_argument("--init-text", type=Path, default=None,
                     help="start the text encoder (and tokenizer) from this diffusers pipeline folder, e.g. "
                          "models/shapes-sd-tiny, instead of from scratch; its config sets the --text-* sizes")
    net.add_argument("--freeze-text", action=argparse.BooleanOptionalAction, default=False,
                     help="keep the text encoder as it starts (with --init-text: the UNet learns to read features "
                          "that already tell the caption's words apart); --no-freeze-text trains it even where a "
                          "--design freezes it")
    net.add_argument("--init-unet", type=Path, default=None,
                     help="warm start: the UNet's weights from this diffusers pipeline folder (its unet/, e.g. a "
                          "snapshot of another run), which must have this run's UNet architecture; a fresh optimiser "
                          "(fine-tuning with other settings, e.g. --no-freeze-text). Only read when --ckpt-dir has no "
                          "training state yet")
    net.add_argument("--text-film", action="store_true",
                     help="also add the attention-pooled caption to the timestep embedding and let every resnet "
                          "scale and shift by it (diffusers' addition_embed_type='text', as in DeepFloyd IF)")
    net.add_argument("--design", default=None,
                     help=f"a named design from the study, setting the flags above it names: {', '.join(DESIGNS)}")
    train = parser.add_argument_group("diffusion training")
    train.add_argument("--max-steps", type=int, default=2500,
                       help="UNet optimiser steps; the cosine schedule ends here (> 0)")
    train.add_argument("--max-minutes", type=float, default=0,
                       help="time budget of this run in minutes, all stages; training checkpoints and stops "
                            "cleanly when it is reached, then the pipeline is saved (0: no limit)")
    train.add_argument("--batch-size", type=int, default=32, help="images per UNet step (> 0)")
    train.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (> 0)")
    train.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps (>= 0)")
    train.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (>= 0)")
    train.add_argument("--cfg-dropout", type=float, default=0.1,
                       help="fraction of captions replaced by the empty one (classifier-free guidance), 0..1")
    train.add_argument("--ema-decay", type=float, default=0.999, help="maximum EMA decay, 0..1 (warm-up schedule)")
    train.add_argument("--prediction-type", default="v_prediction", choices=("v_prediction", "epsilon"),
                       help="UNet target: v_prediction (default; its x0 estimate stays sane at high noise early in "
                            "training, where epsilon's is amplified up to 1/sqrt(alpha_bar) ~ 150x) or epsilon")
    train.add_argument("--snr-shift", type=float, default=1.0,
                       help="divide the noise schedule's signal-to-noise ratio by this factor at every timestep "
                            "(>= 1; 1: DDPM's linear betas). Hoogeboom et al. 2023 ('simple diffusion'): an image "
                            "with 2x the side needs SNR/4 for the same noise to hide the same structure. Saved in the "
                            "pipeline's scheduler as trained_betas, so sampling uses the same schedule")
    train.add_argument("--zero-terminal-snr", action="store_true",
                       help="rescale the betas so the last timestep holds no signal (alpha_bar_T = 0; Lin et al. "
                            "2024, 'Common diffusion noise schedules and sample steps are flawed'), with v-prediction; "
                            "saved as the scheduler's rescale_betas_zero_snr, so every diffusers sampler starts there")
    train.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR loss weighting gamma (0: plain MSE)")
    train.add_argument("--object-weight", type=float, default=0.0,
                       help="extra weight of the diffusion loss inside the dilated object boxes (0: plain loss); "
                            "the per-pixel weight 1 + w*inside is normalised to mean 1 in every image")
    train.add_argument("--place-captions", type=float, default=0.0,
                       help="probability, 0..1, that a training step reads one of the image's captions that name a "
                            "place (a position or relation word) instead of any of its five; images without one keep "
                            "the uniform draw (0: uniform, as before)")
    train.add_argument("--place-focus", type=float, default=0.0,
                       help="share, 0..1, of each batch given to single-object images read with a caption that names "
                            "the place (names_place), at timesteps --place-focus-min-t..T-1, where the layout is set: "
                            "rows that can teach where, which a uniform batch holds too few of to move place (from "
                            "ft4: 0.5 placed within 20 CPU-minutes, 0.25 with STF targets did not; README; 0: off)")
    train.add_argument("--place-focus-min-t", type=int, default=900,
                       help="lowest timestep of the --place-focus rows (0..999)")
    train.add_argument("--place-focus-after", default="", metavar="STEPS:SHARE",
                       help="from UNet step STEPS of this run on, --place-focus's share becomes SHARE (0..1): a high "
                            "share until place is in, a low one to win shape back (README: 0.5, then 0.15 from step "
                            "1000; empty: the share stays)")
    train.add_argument("--pooled-dropout", type=float, default=0.0,
                       help="with --text-film: probability, 0..1, that a training sample's pooled caption (the "
                            "attention-pooled path added to the timestep embedding) reads the empty caption while "
                            "cross-attention reads its own, so the caption must also pass through cross-attention, "
                            "the only path that can say where (0: both read the caption, as before)")
    train.add_argument("--mirror-pairs", type=float, default=0.0,
                       help="share, 0..1, of each batch made of mirror pairs: an image and its mirror image, whose "
                            "captions swap the place words of that mirror (MIRROR_WORDS), with the same noise, timestep "
                            "and caption choice, so that at the noisy timesteps only the caption's place can tell the "
                            "two targets apart (an image holding a shape whose mirror image is another drawing is "
                            "never mirrored that way: generate_data.CHIRAL_SHAPES; 0: off)")
    train.add_argument("--mirror-axes", type=comma_list(), default="x",
                       help="mirrors of --mirror-pairs, sharing the pairs: x (left-right), y (top-bottom) or x,y")
    train.add_argument("--stf-reference", type=int, default=0,
                       help="Stable Target Field (Xu et al., ICLR 2023) for the captions of single-object images: the "
                            "target is the p(x_t | x0)-weighted mean over this many reference images, the image itself "
                            "and others whose object has every attribute the caption names (shape, and colour, size "
                            "and 3x3 cell where named); at high noise that is the caption's mean image, not one draw "
                            "of it, so what only the caption can say (where) is not drowned by what it cannot "
                            "(0: off; else >= 2; needs the shapes world's object attributes)")
    train.add_argument("--stf-rendered", type=int, default=0,
                       help="draw --stf-reference's references from this many renders per (shape, colour, size, "
                            "cell) of the shapes world (generate_data's renderer: centre jitter, brightness and "
                            "background drawn as in the data; encoded once, cached in --ckpt-dir) instead of the "
                            "training images, so a caption that names many attributes still has a large set (a "
                            "colour, shape and place named: 2 x this many; 0: the training images)")
    train.add_argument("--grounding-loss", type=float, default=0.0,
                       help="weight (>= 0) of a token grounding loss on the UNet's cross-attention maps (TokenCompose, "
                            "Wang et al. 2024): in single-object images, the attention that the tokens of the shape "
                            "word and of the place words receive should fall inside the object's box, "
                            "(1 - share inside)^2 per token and attention layer; ties place words to places "
                            "(0: off)")
    train.add_argument("--grounding-words", type=comma_list(), default="shape,place",
                       help="which words --grounding-loss grounds: shape, place or both (comma-separated)")
    train.add_argument("--grounding-min-t", type=int, default=0,
                       help="ground only the rows whose timestep is at least this, 0..999: where the noise hides the "
                            "object, attention can find its box only by where the caption says it is (0: every row)")
    train.add_argument("--lr-schedule", default="cosine", choices=("cosine", "constant"),
                       help="after warm-up: cosine decay to 5%% at --max-steps, or constant (for time budgets)")
    train.add_argument("--cpu-minutes", type=float, default=0,
                       help="stop the UNet stage after this much process CPU time, all threads summed, carried "
                            "over resumes (0: no limit); fair under shared cores, unlike --max-minutes")
    train.add_argument("--snapshot-cpu-minutes", type=comma_list(float), default="",
                       help="comma-separated CPU-minute marks at which an EMA pipeline is saved to "
                            "<ckpt-dir>/snapshots/cpuNNN (the points of a learning curve)")
    train.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every this many steps (> 0)")
    train.add_argument("--sample-every", type=int, default=400, help="samples grid every this many steps (0: never)")
    sample = parser.add_argument_group("sampling (grids and the recommended setting)")
    sample.add_argument("--sample-steps", type=int, default=20, help="DPM-Solver++ steps (> 0)")
    sample.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (>= 1)")
    # Writes --out and --ckpt-dir, not a run folder; training is logged in <out>/training_log.json.
    run = common_args(parser, "models", QUICK, omit=("run_name", "outputs", "wandb"),
                      helps={"seed": "seed of every random draw (>= 0)"})
    run.add_argument("--dtype", default="auto",
                     help="autocast dtype for training on GPU: float32, bfloat16, float16 or auto (CPU: float32)")
    run.add_argument("--eval-images", type=int, default=500, help="held-out images for the autoencoder PSNR (> 0)")
    args = parser.parse_args(argv)
    design = {}
    if args.design is not None:
        check(args.design in DESIGNS, f"unknown design {args.design!r}; valid: {', '.join(DESIGNS)}")
        design = DESIGNS[args.design]
    # Explicit flags win over a design, and a design over --quick (which only shrinks what the design leaves).
    apply_preset(args, parser, design, argv)
    apply_quick(args, parser, {k: v for k, v in QUICK.items() if k not in design}, argv)
    check_args(args)
    return args


def _widths(text: str, flag: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None
    check(len(widths) >= 2 and all(w > 0 for w in widths), f"{flag} needs >= 2 positive widths, got {text!r}")
    return widths


def check_args(args: argparse.Namespace) -> None:
    for path in args.data:
        check(path.is_file(), f"data file not found: {path}")
    if args.init_text:
        check((args.init_text / "text_encoder" / "config.json").is_file() and (args.init_text / "tokenizer").is_dir(),
              f"--init-text {args.init_text}: no text_encoder/config.json and tokenizer/ there (give a pipeline folder)")
    if args.init_unet:
        check((args.init_unet / "unet" / "config.json").is_file(),
              f"--init-unet {args.init_unet}: no unet/config.json there (give a pipeline folder)")
    for name in ("vae_steps", "vae_batch_size", "max_steps", "batch_size", "ckpt_every", "sample_steps",
                 "eval_images", "latent_channels", "text_hidden", "text_layers", "text_heads", "unet_layers",
                 "attn_head_dim"):
        value = getattr(args, name)
        check(value > 0, f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("attn_levels", "object_weight", "cpu_minutes", "max_images", "vae_crop", "decoder_minutes",
                 "warmup_steps", "sample_every", "threads", "seed", "resolution", "max_minutes", "vae_minutes",
                 "kl_weight", "weight_decay", "snr_gamma", "grounding_loss", "stf_rendered"):
        value = getattr(args, name)
        check(value >= 0, f"--{name.replace('_', '-')} must be >= 0, got {value}")
    check(args.lr > 0 and args.vae_lr > 0, f"learning rates must be > 0, got --lr {args.lr}, --vae-lr {args.vae_lr}")
    check(0 <= args.cfg_dropout <= 1, f"--cfg-dropout must be in 0..1, got {args.cfg_dropout}")
    check(args.snr_shift >= 1, f"--snr-shift must be >= 1, got {args.snr_shift}")
    check(not args.zero_terminal_snr or args.prediction_type == "v_prediction",
          "--zero-terminal-snr needs --prediction-type v_prediction (at SNR 0 the noise itself is the input, so "
          "an epsilon target is trivial and x0 cannot be recovered from it)")
    check(0 < args.ema_decay < 1, f"--ema-decay must be in (0, 1), got {args.ema_decay}")
    check(0 <= args.place_captions <= 1, f"--place-captions must be in [0, 1], got {args.place_captions}")
    check(set(args.grounding_words) <= {"shape", "place"} and args.grounding_words,
          f"--grounding-words must name shape, place or both, got {','.join(args.grounding_words)}")
    check(0 <= args.grounding_min_t <= 999, f"--grounding-min-t must be in 0..999, got {args.grounding_min_t}")
    check(0 <= args.place_focus <= 1, f"--place-focus must be in [0, 1], got {args.place_focus}")
    check(not args.place_focus or round(args.place_focus * args.batch_size) >= 1,
          f"--place-focus {args.place_focus} gives no row of a batch of {args.batch_size} (needs share x batch >= 0.5)")
    check(0 <= args.place_focus_min_t <= 999, f"--place-focus-min-t must be in 0..999, got {args.place_focus_min_t}")
    args.place_focus_switch = _focus_switch(args)
    check(not (args.place_focus and args.mirror_pairs),
          "--place-focus and --mirror-pairs both claim rows of the batch; drop one")
    check(0 <= args.pooled_dropout <= 1, f"--pooled-dropout must be in [0, 1], got {args.pooled_dropout}")
    check(0 <= args.mirror_pairs <= 1, f"--mirror-pairs must be in [0, 1], got {args.mirror_pairs}")
    check(args.stf_reference == 0 or args.stf_reference >= 2,
          f"--stf-reference must be 0 (off) or >= 2 (the image and at least one other), got {args.stf_reference}")
    check(not (args.stf_reference and args.mirror_pairs),
          "--stf-reference and --mirror-pairs cannot be combined (a mirror image has no reference set); drop one")
    check(not args.stf_rendered or args.stf_reference,
          "--stf-rendered sets where --stf-reference's references come from; pass --stf-reference R too")
    check(not (args.stf_reference and args.resolution),
          "--stf-reference reads the objects' 3x3 cells, which --resolution's crop would move; drop one of them")
    check(args.mirror_axes and set(args.mirror_axes) <= set(MIRROR_WORDS)
          and len(set(args.mirror_axes)) == len(args.mirror_axes),
          f"--mirror-axes must be x, y or x,y, got {','.join(args.mirror_axes)}")
    check(not args.mirror_pairs or args.batch_size * args.mirror_pairs >= 2 * len(args.mirror_axes),
          f"--mirror-pairs {args.mirror_pairs} makes fewer than one pair per mirror in a batch of {args.batch_size} "
          f"(needs batch x share >= 2 x the number of --mirror-axes)")
    check(not args.pooled_dropout or args.text_film,
          "--pooled-dropout needs --text-film (without it the caption has no pooled path to drop)")
    check(args.guidance >= 1, f"--guidance must be >= 1, got {args.guidance}")
    check(args.text_hidden % args.text_heads == 0,
          f"--text-heads {args.text_heads} must divide --text-hidden {args.text_hidden}")
    check(args.vae_crop % 8 == 0, f"--vae-crop must be a multiple of 8 pixels, got {args.vae_crop}")
    check(args.resolution % 8 == 0, f"--resolution must be a multiple of 8 pixels, got {args.resolution}")
    args.vae_widths = _widths(args.vae_channels, "--vae-channels")
    args.unet_widths = _widths(args.unet_channels, "--unet-channels")
    for width in args.unet_widths:
        check(width % args.attn_head_dim == 0, f"--attn-head-dim {args.attn_head_dim} must divide UNet width {width}")
    args.attention_heads = attention_heads(args)  # recorded in the training log (the card's architecture row)
    check(args.attn_levels < len(args.unet_widths),
          f"--attn-levels {args.attn_levels} must be below the {len(args.unet_widths)} UNet levels")
    args.snapshot_marks = _marks(args.snapshot_cpu_minutes, "--snapshot-cpu-minutes")
    args.ckpt_dir = args.ckpt_dir or CHECKPOINTS / args.out.name


def _focus_switch(args) -> tuple[int, float] | None:
    """--place-focus-after STEPS:SHARE as (steps, share), or None when empty; the share must give a batch row or be
    0 (the focus ends)."""
    if not args.place_focus_after:
        return None
    check(args.place_focus > 0, "--place-focus-after changes --place-focus's share; pass --place-focus F too")
    parts = args.place_focus_after.split(":")
    try:
        steps, share = parts  # ValueError unless exactly two parts, and unless both are numbers below
        steps, share = int(steps), float(share)
    except ValueError:
        raise UserError("--place-focus-after must be STEPS:SHARE (e.g. 1000:0.15), "
                        f"got {args.place_focus_after!r}") from None
    check(steps > 0 and 0 <= share <= 1,
          f"--place-focus-after needs STEPS > 0 and SHARE in [0, 1], got {args.place_focus_after!r}")
    check(share == 0 or round(share * args.batch_size) >= 1,
          f"--place-focus-after share {share:g} gives no row of a batch of {args.batch_size} (use 0 to end the focus)")
    return steps, share


def _marks(minutes: list[float], flag: str) -> tuple[float, ...]:
    """CPU-minute marks in increasing order, each > 0."""
    check(all(m > 0 for m in minutes), f"{flag} must be > 0, got {', '.join(f'{m:g}' for m in minutes)}")
    return tuple(sorted(minutes))


def adopt_text_encoder(args) -> None:
    """--init-text: its text encoder's sizes become the --text-* flags, and its tokenizer (the token ids the encoder
    was trained on) the run's (check_args has made sure the folder has both)."""
    c = read_json(args.init_text / "text_encoder" / "config.json")
    args.text_hidden, args.text_layers, args.text_heads = (c["hidden_size"], c["num_hidden_layers"],
                                                           c["num_attention_heads"])
    if not (args.ckpt_dir / "tokenizer").is_dir():
        shutil.copytree(args.init_text / "tokenizer", args.ckpt_dir / "tokenizer")


def check_architecture(args) -> None:
    """Refuse, in one line, to resume a checkpoint folder that was made for another architecture."""
    path = args.ckpt_dir / "architecture.json"
    now = {k: getattr(args, k) for k in ARCH_KEYS}
    now["attention_heads"] = attention_heads(args)
    if not path.is_file():
        write_json(path, now)
        return
    saved = json.loads(path.read_text())
    saved = {k: saved.get(k, ARCH_DEFAULTS.get(k)) for k in ARCH_KEYS} | {
        # made before heads were width // --attn-head-dim: diffusers then read --attn-head-dim as the head count
        "attention_heads": saved.get("attention_heads", [saved.get("attn_head_dim")] * len(args.unet_widths))}
    diff = [f"--{k.replace('_', '-')} {saved[k]} (now {now[k]})" for k in ARCH_KEYS if saved[k] != now[k]]
    if saved["attention_heads"] != now["attention_heads"]:
        diff.append(f"attention heads per UNet level {saved['attention_heads']} (now {now['attention_heads']}; "
                    "before the fix, diffusers read --attn-head-dim as the number of heads)")
    check(not diff, f"{args.ckpt_dir} holds a model trained with {'; '.join(diff)}: pass the same flags (or "
                    f"--design), --fresh to start over, or another --ckpt-dir")


# --------------------------------------------------------------------------- 1. data and tokenizer
def load_images_and_captions(args) -> tuple[torch.Tensor, list[list[str]], torch.Tensor | None, list[list],
                                             list[list[str]], list[list[dict]]]:
    """Training images (uint8 N x 3 x H x W), their captions, held-out images for the PSNR (or None), each training
    image's object boxes ([x, y, w, h] in pixels, COCO order; empty where the data has none), the category names
    of those objects (same order) and the shapes world's object attributes (shape, color, size, cell; empty where
    the data has none, as COCO)."""
    from PIL import Image

    records, names = [], []
    for i, path in enumerate(args.data):
        data = load_data(path)
        check(args.split in data["splits"], f"unknown split {args.split!r} in {path}; it has {sorted(data['splits'])}")
        records += data["splits"][args.split]
        category = {c["id"]: c["name"] for c in data.get("categories", [])}
        names += [[category.get(c, str(c)) for c in r.get("category_ids") or []] for r in data["splits"][args.split]]
        if i == 0:
            held_out = data["splits"].get(args.eval_split, [])[: args.eval_images]
    check(records, f"split {args.split!r} has no images")
    if args.max_images:
        records, names = records[: args.max_images], names[: args.max_images]

    boxes = [list(r.get("bboxes") or []) for r in records]

    def read(recs, boxes=None):
        arrays = []
        for k, r in enumerate(tqdm(recs, desc="images", leave=False)):
            image = Image.open(r["path"]).convert("RGB")
            if args.resolution:
                image, moved = square_crop(image, args.resolution, boxes[k] if boxes else [])
                if boxes:
                    boxes[k] = moved
            arrays.append(np.asarray(image))
        shapes = {a.shape for a in arrays}
        check(len(shapes) == 1, f"training images must share one size; found {sorted(shapes)[:3]} (--resolution N "
                                f"resizes and centre-crops them to N x N)")
        side = arrays[0].shape[0]
        check(arrays[0].shape[1] == side and side % 8 == 0, f"images must be square with a side divisible by 8; "
                                                            f"got {arrays[0].shape[:2]} (see --resolution)")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    images = read(records, boxes)
    eval_images = read(held_out) if held_out else None
    captions = [[" ".join(c.lower().split()) for c in r["captions"]] for r in records]
    return images, captions, eval_images, boxes, names, [list(r.get("objects") or []) for r in records]


def square_crop(image, side: int, boxes: list) -> tuple:
    """Resize a PIL image's shorter side to `side` (bicubic) and centre-crop it to side x side, as diffusers'
    text-to-image training example does with --resolution and --center_crop; returns (image, its boxes
    [x, y, w, h] in the new pixels, clipped to the crop, those left empty dropped)."""
    from PIL import Image

    w, h = image.size
    scale = side / min(w, h)
    nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
    left, top = (nw - side) // 2, (nh - side) // 2
    image = image.resize((nw, nh), Image.BICUBIC).crop((left, top, left + side, top + side))
    out = []
    for x, y, bw, bh in boxes:
        x0, y0 = max(0.0, x * scale - left), max(0.0, y * scale - top)
        x1, y1 = min(float(side), (x + bw) * scale - left), min(float(side), (y + bh) * scale - top)
        if x1 > x0 and y1 > y0:
            out.append([x0, y0, x1 - x0, y1 - y0])
    return image, out


def object_masks(boxes: list[list], image_side: int, latent_side: int, dilate: int = 1) -> torch.Tensor:
    """uint8 (N, 1, latent_side, latent_side): 1 inside each image's object boxes, grown by `dilate` latent pixels.

    Args:
        boxes: per image, COCO boxes [x, y, w, h] in pixels of an image_side x image_side image.
        image_side: image side in pixels.
        latent_side: side of the grid the loss is computed on.
        dilate: latent pixels added on every side (the anti-aliased edge and the shape's outline).
    """
    scale = latent_side / image_side
    masks = torch.zeros(len(boxes), 1, latent_side, latent_side, dtype=torch.uint8)
    for i, image_boxes in enumerate(boxes):
        for x, y, w, h in image_boxes:
            x0, y0 = max(0, math.floor(x * scale) - dilate), max(0, math.floor(y * scale) - dilate)
            x1 = min(latent_side, math.ceil((x + w) * scale) + dilate)
            y1 = min(latent_side, math.ceil((y + h) * scale) + dilate)
            masks[i, 0, y0:y1, x0:x1] = 1
    return masks


VOCAB_CAP = 5000  # BPE vocabulary size at most


def build_tokenizer(captions: list[list[str]], folder: Path):
    """A CLIP-format BPE (vocab.json + merges.txt) whose merges run until every caption word is one token.

    The HF `tokenizers` trainer does the counting and merging; CLIPTokenizer then reads the two files like
    openai/clip-vit-large-patch14's, so pipelines load it the usual way.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import CLIPTokenizer

    texts = [c for caps in captions for c in caps]
    if not (folder / "vocab.json").is_file():
        bpe = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
        # CLIP splits letters, digits and punctuation runs apart; Whitespace() cuts the same places for our text.
        bpe.pre_tokenizer = pre_tokenizers.Whitespace()
        alphabet = [chr(c) for c in range(33, 127)]  # printable ASCII, so unseen words still tokenize
        trainer = trainers.BpeTrainer(vocab_size=VOCAB_CAP, min_frequency=1, special_tokens=[BOS, EOS],
                                      initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False)
        bpe.train_from_iterator(texts, trainer)
        model = json.loads(bpe.to_str())["model"]
        vocab = dict(model["vocab"])
        for ch in alphabet:  # CLIP's vocab has every base symbol also as a word end
            vocab.setdefault(ch + "</w>", len(vocab))
        merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                            bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
        longest = max(len(ids) for ids in tok(texts).input_ids)
        tok.model_max_length = 8 * math.ceil((longest + 4) / 8)  # room for prompts longer than any caption
        tok.save_pretrained(folder)
    tok = CLIPTokenizer.from_pretrained(folder)
    # A tokenizer left from other captions splits these words (unless the vocabulary hit its cap, as real COCO's
    # tens of thousands of words do: then rare words split by design).
    probe = texts[0]
    check(len(tok) >= VOCAB_CAP or len(tok(probe).input_ids) == len(Whitespace().pre_tokenize_str(probe)) + 2,
          f"tokenizer in {folder} splits caption words such as {probe!r}; delete it to rebuild")
    return tok


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# --------------------------------------------------------------------------- 2. autoencoder
def make_vae(args, side: int):
    from diffusers import AutoencoderKL

    widths = args.vae_widths
    groups = math.gcd(32, *widths)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=args.latent_channels,
                         block_out_channels=widths, layers_per_block=1, norm_num_groups=groups, sample_size=side,
                         mid_block_add_attention=False,  # convolutions only: trains on crops, costs less
                         down_block_types=("DownEncoderBlock2D",) * len(widths),
                         up_block_types=("UpDecoderBlock2D",) * len(widths))


def to_unit(images: torch.Tensor, device) -> torch.Tensor:
    return images.to(device).float() / 127.5 - 1.0


def object_weighted_loss(recon: torch.Tensor, x: torch.Tensor, boost: float = 5.0) -> torch.Tensor:
    """L1 + MSE with saturated pixels weighted up to 1 + boost times.

    Objects are saturated colours and backgrounds muted, so this spends the short training on the shapes
    (their colour and outline) rather than on background grain that no small latent can keep anyway.
    """
    saturation = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 2  # 0..1
    weight = 1 + boost * saturation
    err = recon - x
    return ((err.abs() + err.pow(2)) * weight).mean() / weight.mean()


def random_crop(images: torch.Tensor, side: int, gen: torch.Generator) -> torch.Tensor:
    """One random side x side window for the whole batch (side 0 or >= the image: the whole images)."""
    if not side or side >= images.shape[-1]:
        return images
    top, left = (int(v) for v in torch.randint(images.shape[-1] - side + 1, (2,), generator=gen))
    return images[..., top:top + side, left:left + side]


def psnr(vae, images: torch.Tensor, device, batch: int = 64) -> float:
    """Mean PSNR (dB, pixels in 0..255) of posterior-mean reconstructions."""
    values = []
    vae.eval()
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = to_unit(images[start:start + batch], device)
            recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            mse = ((recon - x) * 127.5).round().pow(2).flatten(1).mean(1)
            values.append(10 * torch.log10(255.0**2 / mse.clamp(min=1e-10)))
    return float(torch.cat(values).mean())


def train_vae(args, images, eval_images, device, deadline: float) -> tuple:
    """Train (or resume, or load) the autoencoder; returns (vae, info dict)."""
    from diffusers import AutoencoderKL

    done = args.ckpt_dir / "vae"
    if (done / "config.json").is_file():
        info = json.loads((args.ckpt_dir / "vae_info.json").read_text())
        return AutoencoderKL.from_pretrained(done).to(device), info
    if args.init_vae is not None:
        return init_vae(args, done, device)
    vae = make_vae(args, images.shape[-1]).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, args.vae_steps) / args.vae_steps)))
    gen = torch.Generator().manual_seed(args.seed)
    state_path = args.ckpt_dir / "vae_state.pt"
    step, losses, seconds = 0, [], 0.0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        step, losses, seconds = state["step"], state["losses"], state["seconds"]

    def save():
        atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "gen": gen.get_state(), "step": step, "losses": losses, "seconds": seconds}, state_path)

    vae_deadline = time.time() + 60 * args.vae_minutes if args.vae_minutes else float("inf")
    vae.train()
    bar = tqdm(total=args.vae_steps, initial=step, desc="autoencoder")
    start = time.time() - seconds
    try:
        while step < args.vae_steps and time.time() < min(deadline, vae_deadline):
            idx = torch.randint(len(images), (args.vae_batch_size,), generator=gen)
            x = to_unit(random_crop(images[idx], args.vae_crop, gen), device)
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
            recon = vae.decode(z).sample
            rec = object_weighted_loss(recon, x)
            loss = rec + args.kl_weight * posterior.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(round(rec.item(), 5))
            bar.update(1)
            bar.set_postfix(loss=f"{rec.item():.4f}")
            if step % 250 == 0:
                seconds = time.time() - start
                save()
    except KeyboardInterrupt:
        seconds = time.time() - start
        save()
        raise
    bar.close()
    seconds = time.time() - start
    info = {"steps": step, "seconds": round(seconds, 1), "final_loss": losses[-1] if losses else None,
            "loss_curve": losses[:: max(1, len(losses) // 200)]}
    info["psnr_db"] = round(psnr(vae, eval_images, device), 2) if eval_images is not None else None
    info["psnr_images"] = 0 if eval_images is None else len(eval_images)
    vae.save_pretrained(done)
    write_json(args.ckpt_dir / "vae_info.json", info)
    state_path.unlink(missing_ok=True)
    return vae, info


def vae_info_path(folder: Path) -> Path | None:
    """The training record of an autoencoder folder: its own vae_info.json (a shipped one, e.g. models/shapes-vae-f2)
    or the one beside it (a checkpoint's vae/); None when neither exists."""
    for path in (folder / "vae_info.json", folder.parent / "vae_info.json"):
        if path.is_file():
            return path
    return None


def init_vae(args, done: Path, device) -> tuple:
    """Copy the trained autoencoder in --init-vae into the checkpoint folder (so a resume reads it from there).

    Raises UserError when the folder holds no AutoencoderKL or one of another architecture than the flags ask for.
    """
    from diffusers import AutoencoderKL

    source = args.init_vae
    check((source / "config.json").is_file(), f"--init-vae {source}: no AutoencoderKL folder (config.json) there")
    config = json.loads((source / "config.json").read_text())
    have = (tuple(config.get("block_out_channels", ())), config.get("latent_channels"))
    want = (tuple(args.vae_widths), args.latent_channels)
    check(have == want, f"--init-vae {source} has block widths {','.join(map(str, have[0]))} and "
                        f"{have[1]} latent channels; the flags ask for {args.vae_channels} and "
                        f"{args.latent_channels} (pass the autoencoder's --design or --vae-channels/--latent-channels)")
    vae = AutoencoderKL.from_pretrained(source)
    info_path = vae_info_path(source)
    info = read_json(info_path) if info_path else {}
    info["init_from"] = str(source)
    vae.save_pretrained(done)
    write_json(args.ckpt_dir / "vae_info.json", info)
    return vae.to(device), info


def save_vae_atomically(vae, folder: Path) -> None:
    """save_pretrained into a sibling folder, then swap it in (a reader never sees half a model)."""
    tmp, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    vae.save_pretrained(tmp)
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old)


def finetune_decoder(args, images, eval_images, device) -> dict:
    """More decoder training on posterior samples of the frozen encoder; updates ckpt_dir/vae in place."""
    from diffusers import AutoencoderKL

    folder = args.ckpt_dir / "vae"
    check((folder / "config.json").is_file(), f"no finished autoencoder in {folder}; run the usual training first")
    vae = AutoencoderKL.from_pretrained(folder).to(device)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=args.vae_lr / 2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 2)
    info = json.loads((args.ckpt_dir / "vae_info.json").read_text())
    start, total, step = time.time(), 60 * args.decoder_minutes, 0
    vae.train()
    bar = tqdm(desc="decoder")
    while time.time() - start < total:
        for group in opt.param_groups:  # linear decay over the time budget
            group["lr"] = args.vae_lr / 2 * max(0.02, 1 - (time.time() - start) / total)
        idx = torch.randint(len(images), (args.vae_batch_size,), generator=gen)
        x = to_unit(random_crop(images[idx], args.vae_crop, gen), device)
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        loss = object_weighted_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 200 == 0:
            save_vae_atomically(vae, folder)
    bar.close()
    info["decoder_finetune_steps"] = info.get("decoder_finetune_steps", 0) + step
    info["decoder_finetune_seconds"] = round(info.get("decoder_finetune_seconds", 0) + time.time() - start, 1)
    info["psnr_db"] = round(psnr(vae, eval_images, device), 2) if eval_images is not None else None
    save_vae_atomically(vae, folder)
    write_json(args.ckpt_dir / "vae_info.json", info)
    return info


def posterior(vae, images: torch.Tensor, device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The autoencoder's posterior mean and std of uint8 N x 3 x H x W images, unscaled (fp32, CPU), N x C x h x w."""
    vae.eval()
    means, stds = [], []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch), desc="latents", leave=False):
            dist = vae.encode(to_unit(images[start:start + batch], device)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def encode_latents(args, vae, images, device, name: str = "latents.pt") -> dict:
    """Posterior mean and std of every training image (fp16, CPU), encoded once (cached as --ckpt-dir/`name`); plus
    1/std for scaling."""
    path = args.ckpt_dir / name
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    mean, std = posterior(vae, images, device)
    scaling = float(1.0 / torch.sqrt(mean.var() + std.pow(2).mean()))  # std of posterior samples
    latents = {"mean": mean.half(), "std": std.half(), "scaling_factor": scaling}
    atomic_save(latents, path)
    return latents


def rendered_references(per_key: int, seed: int, side: int) -> tuple[list[dict], torch.Tensor]:
    """`per_key` renders of every (shape, colour, size, cell) of the shapes world, one object each, centre jitter,
    brightness and background drawn as the data draws them (generate_data.posed_object, render_scene): the
    reference pool of --stf-rendered.

    Returns:
        objects: the object dict of each render (12 x 8 x 2 x 9 x per_key of them, key by key).
        images: uint8 N x 3 x side x side.
    """
    from generate_data import CELLS, COLORS, SHAPES, SIZES, posed_object, render_scene

    keys = list(itertools.product(SHAPES, COLORS, SIZES, CELLS))
    objects, images = [], []
    for j, (shape, color, size, cell) in enumerate(tqdm(keys, desc="STF references", leave=False)):
        rng = np.random.default_rng([seed, j])
        for _ in range(per_key):
            obj = posed_object(shape, color, size, cell, rng)
            objects.append(obj)
            images.append(np.asarray(render_scene([obj], side, rng)))
    return objects, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def reference_latents(args, vae, side: int, device) -> dict:
    """--stf-rendered's pool: {"objects": per render its object, "mean": fp16 N x C x h x w posterior means},
    rendered and encoded once (cached as --ckpt-dir/stf_rendered_<per key>_<side>px.pt)."""
    path = args.ckpt_dir / f"stf_rendered_{args.stf_rendered}_{side}px.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    objects, images = rendered_references(args.stf_rendered, args.seed, side)
    pool = {"objects": objects, "mean": posterior(vae, images, device)[0].half()}
    atomic_save(pool, path)
    return pool


# --------------------------------------------------------------------------- 3. text encoder, UNet, training
def make_text_encoder(args, tokenizer):
    """A fresh CLIPTextModel of the --text-* sizes, or --init-text's text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if args.init_text:
        return CLIPTextModel.from_pretrained(args.init_text / "text_encoder")
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=args.text_hidden,
                            intermediate_size=4 * args.text_hidden, num_hidden_layers=args.text_layers,
                            num_attention_heads=args.text_heads, max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, projection_dim=args.text_hidden)
    return CLIPTextModel(config)


def attention_heads(args) -> list[int]:
    """Attention heads per UNet level: width // --attn-head-dim, so every head has --attn-head-dim channels."""
    return [w // args.attn_head_dim for w in args.unet_widths]


def make_unet(args, latent_side: int):
    from diffusers import UNet2DConditionModel

    levels = len(args.unet_widths)
    attn = args.attn_levels or levels - 1
    return UNet2DConditionModel(
        sample_size=latent_side, in_channels=args.latent_channels, out_channels=args.latent_channels,
        block_out_channels=args.unet_widths, layers_per_block=args.unet_layers,
        # Attention only at the `attn` lowest resolutions (self-attention at 32x32 costs 3x the whole step,
        # fact 3 of issue 10); text enters there.
        down_block_types=("DownBlock2D",) * (levels - attn) + ("CrossAttnDownBlock2D",) * attn,
        up_block_types=("CrossAttnUpBlock2D",) * attn + ("UpBlock2D",) * (levels - attn),
        # diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads (a naming quirk kept for
        # SD 1.x configs), so heads of --attn-head-dim channels are width // attn_head_dim heads per level.
        cross_attention_dim=args.text_hidden, attention_head_dim=attention_heads(args),
        norm_num_groups=math.gcd(32, *args.unet_widths),
        # --text-film: a second, global path for the caption that reaches every resnet block (FiLM), not only the
        # cross-attention at the low resolutions; pooling heads of --attn-head-dim channels.
        **(dict(addition_embed_type="text", addition_embed_type_num_heads=args.text_hidden // args.attn_head_dim,
                resnet_time_scale_shift="scale_shift") if args.text_film else {}))


def warm_start_unet(unet, folder: Path) -> None:
    """Load a saved UNet2DConditionModel's weights (`folder`: its config.json + weights) into `unet`.

    Raises:
        UserError: the saved UNet's architecture differs (one line naming the differing config keys).
    """
    from diffusers import UNet2DConditionModel

    saved = UNet2DConditionModel.from_pretrained(folder)
    keys = [k for k in unet.config if not k.startswith("_") and k in saved.config
            and _as_list(saved.config[k]) != _as_list(unet.config[k])]
    check(not keys, f"--init-unet {folder.parent}: its UNet differs from this run's in "
                    + "; ".join(f"{k} {_as_list(saved.config[k])} (now {_as_list(unet.config[k])})" for k in keys))
    unet.load_state_dict(saved.state_dict())


def warm_start_record(folder: Path) -> dict:
    """What a run warm-started from the pipeline `folder` (--init-unet) inherits, kept in <ckpt-dir>/warm_start.json
    when the warm start happens (the folder may be overwritten later, e.g. by shipping this run into it): the UNet
    steps and CPU-seconds that made those weights (the folder's own warm start included) and its learning curve
    points (already counted from the first run), so this run's steps, CPU-hours and curve continue them."""
    log = read_json(folder / "training_log.json") if (folder / "training_log.json").is_file() else {}
    before = log.get("warm_start") or {}
    curve = read_json(folder / "learning_curve.json") if (folder / "learning_curve.json").is_file() else {}
    return {"from": repo_path(folder), "steps": log.get("steps", 0) + before.get("steps", 0),
            "cpu_seconds": round(log.get("cpu_seconds", 0) + before.get("cpu_seconds", 0), 1),
            "curve_points": curve.get("points", []), "curve_oracle_sha256_12": curve.get("oracle_sha256_12"),
            "curve_n_prompts": curve.get("n_prompts")}


def warm_start_of(ckpt_dir: Path) -> dict | None:
    """The run's warm start (`warm_start_record`, without the curve points) or None when it started from scratch."""
    path = ckpt_dir / "warm_start.json"
    return {k: v for k, v in read_json(path).items() if k != "curve_points"} if path.is_file() else None


def _as_list(value):
    """Config values compare equal whether saved as JSON lists or held as tuples."""
    return list(value) if isinstance(value, (list, tuple)) else value


def make_noise_scheduler(prediction_type: str = "v_prediction", snr_shift: float = 1.0,
                         zero_terminal_snr: bool = False):
    """DDPMScheduler with 1000 timesteps: DDPM's linear betas, their SNR divided by `snr_shift` when it is > 1.

    SNR'(t) = SNR(t) / s, i.e. alpha_bar' = alpha_bar / (s - (s - 1) alpha_bar) (Hoogeboom et al. 2023, "simple
    diffusion", sec. 3.1); the shifted betas are stored as `trained_betas`, which every diffusers scheduler reads.
    `zero_terminal_snr` rescales them so that alpha_bar_T = 0 (diffusers' `rescale_betas_zero_snr`, Lin et al. 2024,
    Algorithm 1), applied before the shift (which keeps alpha_bar_T = 0).
    """
    from diffusers import DDPMScheduler

    # DDPM's linear betas: at 16x16 latents SD's scaled-linear schedule leaves too much signal at t=T.
    kwargs = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    if zero_terminal_snr:
        kwargs["rescale_betas_zero_snr"] = True
    if snr_shift == 1:
        return DDPMScheduler(**kwargs)
    bar = DDPMScheduler(**kwargs).alphas_cumprod.double()
    bar = bar / (snr_shift - (snr_shift - 1) * bar)
    betas = 1 - bar / torch.cat([torch.ones(1, dtype=bar.dtype), bar[:-1]])
    return DDPMScheduler(**kwargs, trained_betas=betas.tolist())


def hardware_text(device) -> str:
    """Where a model was trained, in words (the model cards' "hardware")."""
    return (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} torch thread(s) on a {os.cpu_count()}-core machine")


def make_sampler(noise_scheduler):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(noise_scheduler.config, algorithm_type="dpmsolver++",
                                                   solver_order=2)


def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_lambda(args):
    def fn(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


class Batch(NamedTuple):
    """One training batch (B rows): latents B x C x s x s, token ids B x L, noise, timesteps B, per-pixel loss weights
    (--object-weight, else None), rows whose pooled caption path reads the empty caption (--pooled-dropout, else None),
    and the grounding targets (--grounding-loss, else None): tokens to ground B x L bool, object masks B x 1 x s x s;
    the Stable Target Field references (--stf-reference, else None)."""
    latents: torch.Tensor
    ids: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    weight: torch.Tensor | None
    pooled_drop: torch.Tensor | None
    ground: tuple | None
    refs: tuple | None = None  # --stf-reference: (rows r, their reference latents r x (R-1) x C x s x s)


def grounding_token_ids(tokenizer, kinds=("shape", "place")) -> torch.Tensor:
    """Ids of the words whose cross-attention --grounding-loss ties to the object: the shapes world's shape names
    ("shape") and the place words of its cells ("place": top, middle, bottom, left, center, right), each one token of
    the tokenizer (words it does not have are left out)."""
    from generate_data import COLS, ROWS, SHAPES

    words = (*(SHAPES if "shape" in kinds else ()), *((*ROWS, *COLS) if "place" in kinds else ()))
    ids = [tokenizer(w, add_special_tokens=False).input_ids for w in words]
    return torch.tensor(sorted({i[0] for i in ids if len(i) == 1 and i[0] != tokenizer.unk_token_id}))


@contextlib.contextmanager
def record_cross_attention(unet, enabled: bool = True):
    """Within the block, every cross-attention layer of `unet` runs diffusers' plain `AttnProcessor` (same weights,
    same outputs as the default one) and the attention probabilities it computes ((B * heads) x HW x L, with their
    gradient) are appended, with the layer's head count, to the list this yields (empty when not enabled). The
    processors in place before come back after."""
    from diffusers.models.attention_processor import AttnProcessor

    maps: list = []
    if not enabled:
        yield maps
        return
    layers = [module for name, module in unet.named_modules() if name.endswith("attn2")]

    def recording(attn):
        scores = attn.get_attention_scores

        def get_attention_scores(query, key, attention_mask=None):
            probs = scores(query, key, attention_mask)
            maps.append((probs, attn.heads))
            return probs
        return get_attention_scores

    before = unet.attn_processors
    for attn in layers:  # an instance attribute over the class's method, removed afterwards
        attn.get_attention_scores = recording(attn)
    unet.set_attn_processor({name: AttnProcessor() if name.endswith("attn2.processor") else proc
                             for name, proc in before.items()})
    try:
        yield maps
    finally:
        for attn in layers:
            del attn.get_attention_scores
        unet.set_attn_processor(before)


def grounding_loss(maps: list, tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss (Wang et al., CVPR 2024, eq. 2): for every token to ground and every cross-attention
    layer, (1 - the share of the attention it receives that falls inside the object's mask)^2, averaged.

    Args:
        maps: (probabilities (B * heads) x HW x L, heads) per layer, as `record_cross_attention` collects them.
        tokens: B x L bool, the tokens to ground.
        masks: B x 1 x s x s, 1 inside the object (max-pooled to each layer's grid).
    Returns:
        a scalar (0 when no token is to be grounded).
    """
    if not bool(tokens.any()) or not maps:
        return torch.zeros((), device=tokens.device)
    losses = []
    for probs, heads in maps:
        batch, side = tokens.shape[0], math.isqrt(probs.shape[1])
        attention = probs.view(batch, heads, probs.shape[1], probs.shape[2]).float().mean(1)  # B x HW x L
        inside = F.adaptive_max_pool2d(masks, side).flatten(1)[:, :, None]  # B x HW x 1
        share = (attention * inside).sum(1) / attention.sum(1).clamp_min(1e-8)  # B x L
        losses.append(((1 - share) ** 2)[tokens])
    return torch.cat(losses).mean()


@contextlib.contextmanager
def pooled_caption(unet, hidden: torch.Tensor | None):
    """Within the block, the UNet's pooled caption path (diffusers' addition_embed_type="text": the caption's hidden
    states, attention-pooled, added to the timestep embedding) reads `hidden` (B x L x D) instead of the
    encoder_hidden_states that cross-attention reads; None changes nothing. Lets training drop one path
    (--pooled-dropout) and `caption_use` measure each path's share."""
    if hidden is None:
        yield
        return
    handle = unet.add_embedding.register_forward_pre_hook(lambda module, inputs: (hidden,))
    try:
        yield
    finally:
        handle.remove()


class Trainer:
    """Joint CLIPTextModel + UNet training on precomputed latents, with EMA, checkpoints and sample grids."""

    def __init__(self, args, tokenizer, vae, latents, captions, device, masks: torch.Tensor | None = None,
                 single: torch.Tensor | None = None, mirror: dict | None = None, objects: list | None = None,
                 references: dict | None = None):
        from diffusers.training_utils import EMAModel

        self.args, self.tokenizer, self.vae, self.device = args, tokenizer, vae, device
        self.mean, self.std = latents["mean"], latents["std"]
        self.scaling = latents["scaling_factor"]
        self.masks = masks  # uint8 N x 1 x s x s object masks, for --object-weight and --grounding-loss
        self.single = single  # N bool: the image holds one object (--grounding-loss)
        self.ground_ids = grounding_token_ids(tokenizer, args.grounding_words) if args.grounding_loss else None
        self.grounding_recent: list[float] = []  # --grounding-loss values since the last log entry
        five = _chunks_of_five(captions)
        self.tokens = torch.stack([tokenize(tokenizer, caps) for caps in five])  # N x 5 x L
        self.places = torch.tensor([[names_place(c) for c in caps] for caps in five])  # N x 5 bool, --place-captions
        # --place-focus: the (image, caption) pairs of single-object images whose caption names the place
        self.focus = (self.places & single[:, None]).nonzero() if args.place_focus else None
        check(self.focus is None or len(self.focus) > 0,
              "--place-focus needs single-object training images with a caption that names a place; this data has none")
        # --stf-reference: each caption's reference set (caption_groups), from the shapes world's object attributes;
        # members index the training images, or with --stf-rendered the rendered pool (reference_latents)
        self.ref_mean = references["mean"] if references else self.mean
        self.group, self.members = (caption_groups(objects, captions, references and references["objects"])
                                    if args.stf_reference else (None, None))
        self.empty = tokenize(tokenizer, [""])[0]
        mirror = mirror or {}  # mirror_data's, for --mirror-pairs, with each mirror's caption tokens
        self.mirror = {axis: dict(data, tokens=torch.stack([tokenize(tokenizer, caps)
                                                            for caps in _chunks_of_five(data["captions"])]))
                       for axis, data in mirror.items()}
        self.pairs = mirror_pair_counts(args.batch_size, args.mirror_pairs, list(mirror)) if mirror else {}
        self.text_encoder = make_text_encoder(args, tokenizer).to(device).train()
        self.text_encoder.requires_grad_(not args.freeze_text)
        self.unet = make_unet(args, self.mean.shape[-1]).to(device).train()
        if args.init_unet and not (args.ckpt_dir / "state.pt").is_file():
            warm_start_unet(self.unet, args.init_unet / "unet")
            write_json(args.ckpt_dir / "warm_start.json", warm_start_record(args.init_unet))
        self.noise_scheduler = make_noise_scheduler(args.prediction_type, args.snr_shift, args.zero_terminal_snr)
        params = list(self.unet.parameters()) + [p for p in self.text_encoder.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(args))
        ema = dict(decay=args.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
        self.ema_unet = EMAModel(self.unet.parameters(), **ema)
        self.ema_text = EMAModel(self.text_encoder.parameters(), **ema)
        self.gen = torch.Generator().manual_seed(args.seed + 1)
        self.step, self.seconds, self.cpu_seconds, self.log = 0, 0.0, 0.0, []
        self.autocast = pick_dtype(device, args.dtype) if device.type == "cuda" else None
        self.alphas = self.noise_scheduler.alphas_cumprod.to(device)
        self.state_path = args.ckpt_dir / "state.pt"
        self.starts: list[dict] = []  # every start of this run: {step, cpu_minutes, args}; kept in the checkpoint
        if self.state_path.is_file():
            self.load()
        self.resumed_from_step = self.step
        self.starts.append({"step": self.step, "cpu_minutes": round(self.cpu_seconds / 60, 2),
                            "args": args_as_read(args)})

    # ---- checkpoints
    def save(self) -> None:
        atomic_save({"unet": self.unet.state_dict(), "text": self.text_encoder.state_dict(),
                     "ema_unet": self.ema_unet.state_dict(), "ema_text": self.ema_text.state_dict(),
                     "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "gen": self.gen.get_state(),
                     "torch_rng": torch.get_rng_state(), "step": self.step, "seconds": self.seconds,
                     "cpu_seconds": self.cpu_seconds, "log": self.log, "starts": self.starts}, self.state_path)

    def load(self) -> None:
        state = torch.load(self.state_path, map_location="cpu", weights_only=False)
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text"])
        self.ema_unet.load_state_dict(state["ema_unet"])
        self.ema_text.load_state_dict(state["ema_text"])
        self.ema_unet.to(self.device)
        self.ema_text.to(self.device)
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.seconds, self.log = state["step"], state["seconds"], state["log"]
        self.cpu_seconds = state.get("cpu_seconds", state["seconds"])
        self.starts = state.get("starts", [])  # absent in checkpoints saved before starts were kept

    # ---- one step
    def batch(self) -> Batch:
        """Draw the next batch. With --mirror-pairs the batch ends in one block of k mirror pairs per mirror axis
        (self.pairs), counted from the end: rows a, k images that may be mirrored that way, then rows b, their mirror
        images (mirrored latents, captions and masks) with a's caption choice, caption dropout, noise and timestep.
        With --place-focus it starts with its rows: single-object images read with a caption that names the place (no
        caption dropout), at timesteps --place-focus-min-t..T-1."""
        args, n, size = self.args, len(self.mean), self.args.batch_size
        idx = torch.randint(n, (size,), generator=self.gen)
        blocks, end = [], size  # (rows a, rows b, axis) of each mirror
        for axis, k in self.pairs.items():  # drawn only when asked, so runs without it keep their random stream
            index = self.mirror[axis]["index"]
            idx[end - 2 * k:end] = index[torch.randint(len(index), (k,), generator=self.gen)].repeat(2)
            blocks.append((slice(end - 2 * k, end - k), slice(end - k, end), axis))
            end -= 2 * k
        which = torch.randint(5, (size,), generator=self.gen)
        if args.place_captions:  # upsample captions that say where (the default draws nothing more: same stream)
            places = self.places[idx]
            weights = torch.where(places.any(1, keepdim=True), places.float(), torch.ones_like(places, dtype=torch.float))
            prefer = torch.rand(size, generator=self.gen) < args.place_captions
            which = torch.where(prefer, torch.multinomial(weights, 1, generator=self.gen)[:, 0], which)
        focus = round(self.place_focus_share() * size)
        if focus:  # the first rows: single-object place captions at noisy timesteps (drawn only when asked)
            pick = self.focus[torch.randint(len(self.focus), (focus,), generator=self.gen)]
            idx[:focus], which[:focus] = pick[:, 0], pick[:, 1]
            focus_t = torch.randint(args.place_focus_min_t, self.noise_scheduler.config.num_train_timesteps, (focus,),
                                    generator=self.gen)
        drop = torch.rand(size, generator=self.gen) < args.cfg_dropout
        drop[:focus] = False  # a --place-focus row is there for its caption
        pooled_drop = None
        if args.pooled_dropout:  # drawn only when asked, so runs without it keep their random stream
            pooled_drop = torch.rand(size, generator=self.gen) < args.pooled_dropout
        mean, std = self.mean[idx].float(), self.std[idx].float()
        eps = torch.randn(mean.shape, generator=self.gen)
        noise = torch.randn(mean.shape, generator=self.gen)
        t = torch.randint(self.noise_scheduler.config.num_train_timesteps, (size,), generator=self.gen)
        if focus:
            t[:focus] = focus_t
        masks = None if self.masks is None else self.masks[idx]
        for a, b, axis in blocks:
            dim, data = FLIP_DIMS[axis], self.mirror[axis]
            which[b], drop[b], eps[b], noise[b], t[b] = which[a], drop[a], eps[a].flip(dim), noise[a], t[a]
            mean[b], std[b] = data["mean"][idx[b]].float(), data["std"][idx[b]].float()
            if pooled_drop is not None:
                pooled_drop[b] = pooled_drop[a]
            if masks is not None:
                masks[b] = masks[b].flip(dim)
        ids = self.tokens[idx, which]
        for a, b, axis in blocks:
            ids[b] = self.mirror[axis]["tokens"][idx[b], which[b]]
        ids[drop] = self.empty
        latents = (mean + std * eps) * self.scaling
        refs = None
        if args.stf_reference:  # drawn only when asked, so runs without it keep their random stream
            group = torch.where(drop, -1, self.group[idx, which])
            rows = (group >= 0).nonzero()[:, 0]
            picks = [self.members[g][torch.randint(len(self.members[g]), (args.stf_reference - 1,), generator=self.gen)]
                     for g in group[rows].tolist()]
            picks = torch.stack(picks) if picks else torch.zeros(0, args.stf_reference - 1, dtype=torch.long)
            refs = (rows.to(self.device), (self.ref_mean[picks].float() * self.scaling).to(self.device))
        weight = None
        if args.object_weight:
            weight = 1 + args.object_weight * masks.float()
            weight = weight / weight.mean((1, 2, 3), keepdim=True)  # every image counts the same in the batch
            weight = weight.to(self.device)
        ground = None
        if args.grounding_loss:
            rows = self.single[idx] & (t >= args.grounding_min_t)
            tokens = torch.isin(ids, self.ground_ids) & rows[:, None]
            ground = (tokens.to(self.device), masks.float().to(self.device))
        return Batch(latents.to(self.device), ids.to(self.device), noise.to(self.device), t.to(self.device), weight,
                     pooled_drop, ground, refs)

    def train_step(self) -> float:
        latents, ids, noise, t, weight, pooled_drop, ground, refs = self.batch()
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            cond = self.text_encoder(ids)[0]
            pooled = None
            if pooled_drop is not None and pooled_drop.any():
                empty = self.text_encoder(self.empty[None].to(self.device))[0]
                pooled = torch.where(pooled_drop.to(self.device)[:, None, None], empty, cond)
            with pooled_caption(self.unet, pooled), record_cross_attention(self.unet, ground is not None) as maps:
                pred = self.unet(noisy, t, cond).sample
        v_pred = self.args.prediction_type == "v_prediction"
        target = self.noise_scheduler.get_velocity(latents, noise, t) if v_pred else noise
        if refs is not None and len(refs[0]):
            rows, a = refs[0], self.alphas[t[refs[0]]]
            x0 = stable_target(noisy[rows], latents[rows], refs[1], a)
            eps = (noisy[rows] - a.sqrt().view(-1, 1, 1, 1) * x0) / (1 - a).sqrt().view(-1, 1, 1, 1)
            target = target.clone()  # (the epsilon target is the noise tensor itself)
            target[rows] = self.noise_scheduler.get_velocity(x0, eps, t[rows]) if v_pred else eps
        loss = F.mse_loss(pred.float(), target, reduction="none")
        if weight is not None:
            loss = loss * weight
        loss = loss.flatten(1).mean(1)
        if self.args.snr_gamma:
            # min-SNR-gamma (Hang et al. 2023): down-weights easy low-noise steps; converges faster.
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, t)
            loss = loss * torch.clamp(snr, max=self.args.snr_gamma) / (snr + 1 if v_pred else snr)
        loss = loss.mean()
        if ground is not None:
            grounding = grounding_loss(maps, *ground)
            self.grounding_recent.append(float(grounding.detach()))
            loss = loss + self.args.grounding_loss * grounding
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()
        self.sched.step()
        self.ema_unet.step(self.unet.parameters())
        self.ema_text.step(self.text_encoder.parameters())
        self.step += 1
        return float(loss.detach())

    def place_focus_share(self) -> float:
        """--place-focus's share of the batch at this point of the run (--place-focus-after switches it)."""
        switch = self.args.place_focus_switch
        if switch and self.step >= switch[0]:
            return switch[1]
        return self.args.place_focus

    def cpu_budget_left(self) -> bool:
        return not self.args.cpu_minutes or self.cpu_seconds < 60 * self.args.cpu_minutes

    def run(self, deadline: float) -> bool:
        """Train until --max-steps, --cpu-minutes or the deadline; returns True when the step budget is done."""
        args = self.args
        bar = tqdm(total=args.max_steps, initial=self.step, desc="unet" if args.freeze_text else "unet+text")
        start, recent = time.time() - self.seconds, []
        cpu_start = time.process_time() - self.cpu_seconds
        try:
            while self.step < args.max_steps and time.time() < deadline and self.cpu_budget_left():
                recent.append(self.train_step())
                self.cpu_seconds, self.seconds = time.process_time() - cpu_start, time.time() - start
                bar.update(1)
                self.snapshot_if_due()
                if self.step % 10 == 0 or self.step == args.max_steps:
                    self.seconds = time.time() - start
                    loss = float(np.mean(recent))
                    entry = {"step": self.step, "loss": round(loss, 5), "lr": self.sched.get_last_lr()[0],
                             "seconds": round(self.seconds, 1)}
                    if self.grounding_recent:  # the diffusion loss above includes it, weighted
                        entry["grounding_loss"] = round(float(np.mean(self.grounding_recent)), 5)
                    self.log.append(entry)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.sched.get_last_lr()[0]:.1e}",
                                    **({"grounding": f"{entry['grounding_loss']:.3f}"} if self.grounding_recent else {}))
                    recent, self.grounding_recent = [], []
                if self.step % args.ckpt_every == 0:
                    self.seconds = time.time() - start
                    self.save()
                if args.sample_every and self.step % args.sample_every == 0:
                    self.samples_grid(args.ckpt_dir / f"samples_{self.step:06d}.png")
        except KeyboardInterrupt:
            self.seconds = time.time() - start
            self.save()
            raise
        bar.close()
        self.seconds = time.time() - start
        self.save()
        return self.step >= args.max_steps

    def snapshot_if_due(self) -> None:
        """Save the EMA pipeline once per --snapshot-cpu-minutes mark that the CPU time has passed."""
        for mark in self.args.snapshot_marks:
            folder = self.args.ckpt_dir / "snapshots" / f"cpu{mark:g}"
            if self.cpu_seconds >= 60 * mark and not folder.exists():
                saved = save_pipeline(self, folder)
                write_json(saved["tmp"] / "snapshot.json",
                           {"step": self.step, "cpu_minutes": round(self.cpu_seconds / 60, 2),
                            "wall_minutes": round(self.seconds / 60, 2), "mark": mark, "design": self.args.design})
                os.replace(saved["tmp"], folder)

    # ---- EMA pipeline, grids
    def ema_modules(self):
        """Copies of the text encoder and UNet holding the EMA weights (training weights stay untouched)."""
        unet, text = copy.deepcopy(self.unet).eval(), copy.deepcopy(self.text_encoder).eval()
        self.ema_unet.copy_to(unet.parameters())
        self.ema_text.copy_to(text.parameters())
        return text, unet

    def pipeline(self):
        from diffusers import StableDiffusionPipeline

        text, unet = self.ema_modules()
        vae = copy.deepcopy(self.vae).eval()
        vae.register_to_config(scaling_factor=self.scaling)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=self.tokenizer, unet=unet,
                                       scheduler=make_sampler(self.noise_scheduler), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def samples_grid(self, path: Path, seeds: int = 4) -> None:
        pipe = self.pipeline()
        # `seeds` images per prompt, row-major; image (p, s) uses its own generator seeded `seed + s`
        images = generate_images(pipe, [p for p in SAMPLE_PROMPTS for _ in range(seeds)],
                                 [self.args.seed + s for _ in SAMPLE_PROMPTS for s in range(seeds)],
                                 self.args.sample_steps, self.args.guidance, batch_size=seeds, progress=False)
        image_grid(images, len(SAMPLE_PROMPTS), seeds, row_labels=SAMPLE_PROMPTS,
                   col_labels=[f"seed {self.args.seed + s}" for s in range(seeds)], cell=64).save(path)


# Words that say where something is, in the shapes world's captions ("in the top left", "to the right of", "above")
# and in COCO's ("on the left", "next to", "under").
PLACE_WORDS = re.compile(r"\b(left|right|top|bottom|center|centre|middle|above|below|under|beneath|behind|beside|"
                         r"next to|in front of|on top of)\b")


# --mirror-pairs: the place words each mirror swaps, and the image dimension it flips (N x C x H x W).
MIRROR_WORDS = {"x": {"left": "right", "right": "left"},
                "y": {"top": "bottom", "bottom": "top", "above": "below", "below": "above"}}
FLIP_DIMS = {"x": -1, "y": -2}


def mirror_caption(text: str, axis: str = "x") -> str:
    """The caption of the image mirrored about `axis`: its MIRROR_WORDS swap ("x": "in the top left" -> "in the top
    right", "to the left of" -> "to the right of"; "y": "top" <-> "bottom", "above" <-> "below"); every other word
    stays."""
    words = MIRROR_WORDS[axis]
    return re.sub(rf"\b({'|'.join(words)})\b", lambda m: words[m.group(1)], text)


def mirror_pair_counts(batch_size: int, share: float, axes: list[str]) -> dict[str, int]:
    """Mirror pairs per axis in a batch: round(batch x share / 2) in all, shared out as evenly as the axes allow
    (the first axes get the remainder), at least one each."""
    total = max(len(axes), round(batch_size * share / 2))
    return {axis: total // len(axes) + (i < total % len(axes)) for i, axis in enumerate(axes)}


def mirror_data(args, vae, images: torch.Tensor, captions: list[list[str]], names: list[list[str]],
                device) -> dict[str, dict]:
    """--mirror-pairs: per --mirror-axes axis, the posterior mean and std of every training image mirrored about it
    (fp16, cached as --ckpt-dir/latents_mirror_<axis>.pt), the mirrored captions, and "index", the images that may be
    mirrored that way (none of their objects in generate_data.CHIRAL_SHAPES[axis]). Raises UserError when no image
    may be."""
    from generate_data import CHIRAL_SHAPES

    out = {}
    for axis in args.mirror_axes:
        chiral = set(CHIRAL_SHAPES[axis])
        index = torch.tensor([not set(n) & chiral for n in names]).nonzero()[:, 0]
        check(len(index) > 0, f"--mirror-pairs: every training image holds a shape whose {axis} mirror image is "
                              f"another drawing ({', '.join(sorted(chiral))})")
        latents = encode_latents(args, vae, images.flip(FLIP_DIMS[axis]), device, name=f"latents_mirror_{axis}.pt")
        out[axis] = {"mean": latents["mean"], "std": latents["std"], "index": index,
                     "captions": [[mirror_caption(c, axis) for c in caps] for caps in captions]}
    return out


def names_place(caption: str) -> bool:
    """Whether a caption says where an object is (a PLACE_WORDS match, case-insensitive)."""
    return PLACE_WORDS.search(caption.lower()) is not None


STF_ATTRIBUTES = ("color", "size", "cell")  # what a caption may name besides the shape, which it always names


def caption_groups(objects: list[list[dict]], captions: list[list[str]],
                   pool: list[dict] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Reference sets of --stf-reference: which images fit each caption as well as its own image does.

    Only single-object images get one. Their captions name the shape and sometimes the colour, the size and the 3x3
    cell (a colour or size word of the object in the caption; a place word, `names_place`); the set is every
    candidate whose object agrees on each attribute the caption names: the single-object training images (the image
    itself included), or the `pool` of rendered objects (--stf-rendered).

    Args:
        objects: per image, the shapes world's object dicts (shape, color, size, cell); [] where unknown.
        captions: per image, its captions (any number; read as `_chunks_of_five`).
        pool: one object dict per candidate (`rendered_references`); None: the training images.
    Returns:
        group: long N x 5, the set id of each caption, -1 for images with other than one known object and for
            captions no candidate fits.
        members: per set id, the long tensor of its candidates' indices (training images, or rows of `pool`).
    """
    def key(obj: dict, named) -> tuple:
        return (obj["shape"],) + tuple(str(obj[a]) if a in named else None for a in STF_ATTRIBUTES)

    candidates = enumerate(pool) if pool is not None else ((i, o[0]) for i, o in enumerate(objects) if len(o) == 1)
    ids: dict[tuple, int] = {}
    members: list[list[int]] = []
    for i, obj in candidates:
        for r in range(len(STF_ATTRIBUTES) + 1):
            for named in itertools.combinations(STF_ATTRIBUTES, r):
                k = key(obj, named)
                if k not in ids:
                    ids[k] = len(members)
                    members.append([])
                members[ids[k]].append(i)
    group = torch.full((len(objects), 5), -1, dtype=torch.long)
    for i, (objs, caps) in enumerate(zip(objects, _chunks_of_five(captions))):
        if len(objs) == 1:
            obj = objs[0]
            for j, caption in enumerate(caps):
                words = set(caption.split())
                named = [a for a in STF_ATTRIBUTES if (names_place(caption) if a == "cell" else obj[a] in words)]
                group[i, j] = ids.get(key(obj, named), -1)
    return group, [torch.tensor(m) for m in members]


def stable_target(noisy: torch.Tensor, x0: torch.Tensor, refs: torch.Tensor,
                  alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The Stable Target Field x0 estimate (Xu et al., "Stable Target Field for Reduced Variance Score Estimation in
    Diffusion Models", ICLR 2023, eq. 6): the mean of the candidates x0 and refs weighted by p(x_t | candidate) =
    N(x_t; sqrt(a) c, (1 - a) I), a self-normalised importance sample of E[x0 | x_t, caption].

    Args:
        noisy: x_t, B x C x s x s.
        x0: the clean latents x_t was made from, B x C x s x s.
        refs: B x R x C x s x s other clean latents that fit each row's caption.
        alphas_cumprod: B, alpha-bar at each row's timestep.
    Returns:
        B x C x s x s: ~x0 at low noise (its own latent dominates), ~the mean of x0 and refs at SNR ~ 0.
    """
    candidates = torch.cat([x0[:, None], refs], 1)
    a = alphas_cumprod.view(-1, 1, 1, 1, 1).to(noisy.dtype)
    logw = -((noisy[:, None] - a.sqrt() * candidates) ** 2).flatten(2).sum(2) / (2 * (1 - a.flatten(1)))
    return (logw.softmax(1).view(*logw.shape, 1, 1, 1) * candidates).sum(1)


def _chunks_of_five(captions: list[list[str]]) -> list[list[str]]:
    """Exactly five captions per image (repeat when fewer), so they stack into one tensor."""
    check(all(captions_ for captions_ in captions), "every training image needs at least one caption")
    return [(caps * 5)[:5] for caps in captions]


# --------------------------------------------------------------------------- 4. final save
def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_pipeline(trainer: Trainer, out: Path) -> dict:
    """EMA pipeline in fp16 with safetensors, written to a temp folder then swapped in."""
    pipe = trainer.pipeline()
    counts = {"vae": count_params(pipe.vae), "text_encoder": count_params(pipe.text_encoder),
              "unet": count_params(pipe.unet)}
    pipe.to(torch.float16)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    load_as_float32(tmp)
    # transformers 5 writes only tokenizer.json; keep CLIP's two files too, for readers of either format.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(trainer.args.ckpt_dir / "tokenizer" / name, tmp / "tokenizer" / name)
    return {"tmp": tmp, "params": counts}


def load_as_float32(folder: Path) -> None:
    """Keep fp16 weights on disk but make a bare `from_pretrained(folder)` load every part in fp32.

    transformers 5 loads a model in the dtype its config names ("float16" after `pipe.to(fp16)`), while diffusers
    loads the UNet and VAE in fp32: the text encoder's fp16 output would then hit fp32 layers and fail.
    """
    path = Path(folder) / "text_encoder" / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = "float32"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# Arguments check_args derives from others (each changes with its flag): left out of a resume's changes.
DERIVED_ARGS = ("vae_widths", "unet_widths", "attention_heads", "snapshot_marks", "place_focus_switch")


def args_as_read(args: argparse.Namespace) -> dict:
    """The training arguments as a reader of the repo would type them (paths relative to it; a design's default is
    absolute): the training log's "config" and each start's record."""
    def as_read(v):
        return repo_path(v) if isinstance(v, Path) or (isinstance(v, str) and os.path.isabs(v)) else v

    return {k: [as_read(x) for x in v] if k == "data" else as_read(v) for k, v in vars(args).items()}


def start_history(starts: list[dict]) -> dict:
    """The training log's "starts": where the run's first recorded start began ("first_step", 0 unless its
    checkpoint predates this record) and, for every resume, its step, CPU-minutes and the arguments that changed
    ({name: [before, after]}; `DERIVED_ARGS` and flags the earlier start's code did not have left out), so a card
    can say what a resumed run really did."""
    resumes = [{"step": cur["step"], "cpu_minutes": cur["cpu_minutes"],
                "changed": {k: [prev["args"][k], v] for k, v in cur["args"].items()
                            if k not in DERIVED_ARGS and k in prev["args"] and prev["args"][k] != v}}
               for prev, cur in zip(starts, starts[1:])]
    return {"first_step": starts[0]["step"] if starts else 0, "resumes": resumes}


def finish(trainer: Trainer, args, vae_info: dict, n_images: int, device, wall_start: float) -> dict:
    from diffusers import AutoencoderKL

    # The decoder may have been fine-tuned by a --decoder-minutes process meanwhile: the folder is the truth.
    trainer.vae = AutoencoderKL.from_pretrained(args.ckpt_dir / "vae").to(device)
    vae_info = json.loads((args.ckpt_dir / "vae_info.json").read_text())
    saved = save_pipeline(trainer, args.out)
    tmp = saved["tmp"]
    log = trainer.log
    hardware = hardware_text(device)
    info = {
        "params": saved["params"], "vae": vae_info, "n_images": n_images, "vocab_size": len(trainer.tokenizer),
        "max_length": trainer.tokenizer.model_max_length, "latent_side": trainer.mean.shape[-1],
        "scaling_factor": trainer.scaling, "hardware": hardware, "steps": trainer.step,
        "train_minutes": trainer.seconds / 60, "steps_per_second": trainer.step / max(trainer.seconds, 1e-9),
        "final_loss": float(np.mean([r["loss"] for r in log[-1:]])) if log else None,
        "resumed_from_step": trainer.resumed_from_step,
    }
    training_log = {
        "config": args_as_read(args), "git_commit": git_commit(), "versions": library_versions(),
        "device": str(device), "hardware": hardware, "params": info["params"], "vae": vae_info,
        "scaling_factor": trainer.scaling, "steps": trainer.step, "resumed_from_step": trainer.resumed_from_step,
        "starts": start_history(trainer.starts),
        "warm_start": warm_start_of(args.ckpt_dir),
        "train_seconds": round(trainer.seconds, 1), "cpu_seconds": round(trainer.cpu_seconds, 1),
        "steps_per_second": round(info["steps_per_second"], 3),
        "wall_seconds_this_run": round(time.time() - wall_start, 1), "loss_curve": log,
        # the card's numbers at full precision (`fidelity.py evaluate-model --write-card` rebuilds the card from them)
        "card_facts": {k: v for k, v in info.items() if k not in ("params", "vae")},
    }
    write_json(tmp / "training_log.json", training_log)
    (tmp / "README.md").write_text(model_card(args.out.name, read_json(tmp / "training_log.json")))
    if args.out.exists():
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    return info


# --------------------------------------------------------------------------- design study
def parse_study_args(argv) -> argparse.Namespace:
    from oracle import DEFAULT_ORACLE

    parser = argparse.ArgumentParser(prog="train_diffusion.py study",
                                     description="Train several designs for the same CPU time and score their "
                                                 "learning curves with the oracle.")
    parser.add_argument("--designs", type=comma_list(), default=",".join(DESIGNS),
                        help=f"comma-separated, from {', '.join(DESIGNS)}")
    parser.add_argument("--cpu-minutes", type=float, default=30.0,
                        help="UNet-stage CPU minutes per design (process time, all threads; > 0)")
    parser.add_argument("--eval-at", type=comma_list(float), default="15,30",
                        help="CPU-minute points of each curve to score (<= --cpu-minutes)")
    parser.add_argument("--jobs", type=int, default=2, help="designs trained at once, one torch thread each (> 0)")
    parser.add_argument("--n-prompts", type=int, default=200, help="prompts per kind (single, two) per point (> 0)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data.pkl to train on (split pretrain)")
    parser.add_argument("--oracle", type=Path, default=DEFAULT_ORACLE, help="oracle folder")
    parser.add_argument("--reference-model", type=Path, default=DEFAULT_OUT,
                        help="shipped model whose autoencoder ceiling is measured as a reference")
    parser.add_argument("--extra", default="",
                        help="more train_diffusion.py flags for every design, e.g. '--vae-steps 4 --quick' (tests)")
    parser.add_argument("--ckpt-root", type=Path, default=CHECKPOINTS / "design_study",
                        help="checkpoints of the designs go to <ckpt-root>/<run-name>/<design>")
    # Scoring runs on CPU and each design trains with one thread (--jobs at once): no --device, --threads, --quick.
    common_args(parser, "design_study", omit=("device", "threads", "seed", "quick"),
                helps={"run_name": "run folder under <outputs>/design_study; checkpoints likewise under --ckpt-root"})
    parser.set_defaults(run_name="default")  # a rerun of the same study resumes its designs
    args = parser.parse_args(argv)
    unknown = [d for d in args.designs if d not in DESIGNS]
    check(not unknown and args.designs, f"unknown design(s) {unknown or args.designs!r}; valid: {', '.join(DESIGNS)}")
    check(args.cpu_minutes > 0 and args.jobs > 0 and args.n_prompts > 0,
          "--cpu-minutes, --jobs and --n-prompts must be > 0")
    args.marks = _marks(args.eval_at, "--eval-at")
    check(args.marks and max(args.marks) <= args.cpu_minutes,
          f"--eval-at points must lie in (0, --cpu-minutes {args.cpu_minutes}], got "
          f"{', '.join(f'{m:g}' for m in args.eval_at)}")
    check(args.data.is_file(), f"data file not found: {args.data}")
    return args


def resample_round_trip(side: int):
    """uint8 NHWC -> antialiased downsample to side x side, bicubic back to the original size."""
    def fn(images: np.ndarray) -> np.ndarray:
        from PIL import Image

        full = images.shape[1]
        return np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.LANCZOS)
                                    .resize((full, full), Image.BICUBIC)) for im in images])
    return fn


def score_snapshot(folder: Path, prompts_by_kind: dict, oracle, cache: Path, device="cpu",
                   info: dict | None = None) -> dict:
    """Oracle scores of one pipeline snapshot on the study's prompts, its `caption_use` on the first 32
    single-object prompts, `word_separation` and `place_response` (cached per snapshot and oracle; a cache from
    before a measurement gets it added); the
    images are generated on `device` (the initial noise is drawn on the CPU either way). `info` (step, cpu_minutes)
    stands in for the folder's snapshot.json (a final pipeline has none)."""
    from diffusers import DiffusionPipeline

    from oracle import summarize_scores, to_uint8_64
    from utils import bootstrap_ci, generate_images

    def complete(result: dict) -> bool:  # a cache from before a measurement was added gets it added
        return ("word_separation" in result and "place_response" in result and "caption_use" in result
                and ("xattn_ratio" in result["caption_use"]["t500"] or not result.get("pooled_path", True)))

    result = read_json(cache) if cache.is_file() else None
    if result is not None and complete(result):
        return result
    pipe = DiffusionPipeline.from_pretrained(folder).to(device)
    pipe.set_progress_bar_config(disable=True)
    if result is None:
        result = dict(info or read_json(folder / "snapshot.json"))
        for kind, prompts in prompts_by_kind.items():
            images = to_uint8_64(generate_images(pipe, [p["text"] for p in prompts], list(range(len(prompts))),
                                                 20, 5.0, batch_size=50, progress=False))
            scores = oracle.score(images, prompts)
            summary = summarize_scores(scores)
            summary["all_ci"] = bootstrap_ci([s["all"] for s in scores])["ci95"]
            result[kind] = summary
    result["pooled_path"] = pipe.unet.config.addition_embed_type == "text"
    if not complete(result):
        result["caption_use"] = caption_use(pipe, prompts_by_kind["single"][:32])
    if "word_separation" not in result:
        result["word_separation"] = word_separation(pipe.text_encoder, pipe.tokenizer)
    if "place_response" not in result:
        result["place_response"] = place_response(pipe)
    write_json(cache, result)
    return result


@torch.no_grad()
def word_separation(text_encoder, tokenizer, n: int = 48) -> dict[str, float]:
    """How far apart the text encoder's hidden states (what the UNet's cross-attention reads) put two prompts that
    differ in one attribute: {"position", "color", "shape"} -> mean over n pairs of ||h_a - h_b|| / ||h_a||, over
    the tokens up to the end token. Pairs: `make_prompts("single", n, seed=2)` with a cell, each against itself with
    another cell (resp. colour, shape). Near 0, the encoder has merged the words and no UNet can read the attribute
    from it. Measured: the shipped shapes-tiny's encoder (frozen in the latent-f2-film-text designs) 0.131 / 0.574 /
    0.457 (position / colour / shape), against 0.423 / 0.573 / 0.455 for its own token embeddings (the encoder's
    input) and 0.173 / 0.361 / 0.274 for a random-init CLIPTextModel of the same config: trained beside a UNet that
    ignored place, the encoder passes colour and shape words through and damps place words 3.2x."""
    from generate_data import CELLS, COLOR_NAMES, SHAPES, make_prompts, prompt_text

    prompts = [p for p in make_prompts("single", 4 * n, seed=2) if p["objects"][0]["cell"] is not None][:n]
    ids_a = tokenize(tokenizer, [p["text"] for p in prompts])
    h_a = text_encoder(ids_a.to(text_encoder.device))[0].float()  # the same prompts against each swap
    out = {}
    for key, values in (("position", [list(c) for c in CELLS]), ("color", COLOR_NAMES), ("shape", SHAPES)):
        field = "cell" if key == "position" else key
        other = []
        for p in prompts:
            obj = p["objects"][0]
            swapped = values[(values.index(obj[field]) + 1) % len(values)]
            other.append(prompt_text({**p, "objects": [{**obj, field: swapped}]}))
        ids_b = tokenize(tokenizer, other)
        h_b = text_encoder(ids_b.to(text_encoder.device))[0].float()
        # padding repeats the end token: the tokens before it, and the first end token (CLIP pools there)
        length = 1 + int(max((ids != tokenizer.pad_token_id).sum(1).max() for ids in (ids_a, ids_b)))
        a, b = h_a[:, :length], h_b[:, :length]
        out[key] = round(float(((a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)).mean()), 4)
    return out


def xattn_note(point: dict) -> str:
    """', cross-attention use X' for a curve point whose UNet pools the caption, else ''."""
    ratio = point["caption_use"]["t500"].get("xattn_ratio")
    return "" if ratio is None else f", cross-attention use {ratio:.3f}"


@torch.no_grad()
def caption_use(pipe, prompts: list[dict], timesteps=(200, 500, 800), seed: int = 0) -> dict:
    """How much a pipeline's UNet uses the caption: its denoising loss on renders of `prompts` (after the VAE round
    trip's posterior mean) with each image's own caption, with the captions shifted by one (another prompt's), and
    with the empty caption, at each training timestep in `timesteps` (same noise for the three). Returns
    {"t<N>": {"own", "shuffled", "empty", "ratio"}} with the MSE in the model's prediction space (epsilon or v) and
    ratio = shuffled / own: 1.0 means the caption is ignored (the shipped shapes-tiny: 1.05, 1.56, 1.04 at t = 200, 500,
    800 on the first 32 of `make_prompts("single", 200, seed=0)`). A UNet with a pooled caption path (--text-film)
    also gets each path's share: "xattn_shuffled", cross-attention reading the shifted captions while the pooled path
    reads the own ones, and "pooled_shuffled", the other way round, with their ratios over "own" ("xattn_ratio",
    "pooled_ratio"; 1.0: that path is ignored, and the caption's place, which only cross-attention can say, cannot
    be drawn)."""
    from diffusers import DDPMScheduler

    from generate_data import render_prompts

    device = pipe.unet.device
    x = to_unit(torch.from_numpy(render_prompts(prompts)).permute(0, 3, 1, 2), device)
    latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    texts = [p["text"] for p in prompts]
    hidden = {name: pipe.text_encoder(tokenize(pipe.tokenizer, t).to(device))[0]
              for name, t in (("own", texts), ("shuffled", texts[1:] + texts[:1]), ("empty", [""] * len(texts)))}
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    v_pred = noise_scheduler.config.prediction_type == "v_prediction"
    gen, out = torch.Generator().manual_seed(seed), {}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=gen).to(device)
        tt = torch.full((len(texts),), t, device=device)
        noisy = noise_scheduler.add_noise(latents, noise, tt)
        target = noise_scheduler.get_velocity(latents, noise, tt) if v_pred else noise
        mse = {name: round(F.mse_loss(pipe.unet(noisy, tt, h).sample.float(), target).item(), 5)
               for name, h in hidden.items()}
        ratios = {"ratio": round(mse["shuffled"] / mse["own"], 4)}
        if pipe.unet.config.addition_embed_type == "text":
            for path, (xattn, pooled) in (("xattn", ("shuffled", "own")), ("pooled", ("own", "shuffled"))):
                with pooled_caption(pipe.unet, hidden[pooled]):
                    mse[f"{path}_shuffled"] = round(F.mse_loss(pipe.unet(noisy, tt, hidden[xattn]).sample.float(),
                                                               target).item(), 5)
                ratios[f"{path}_ratio"] = round(mse[f"{path}_shuffled"] / mse["own"], 4)
        out[f"t{t}"] = {**mse, **ratios}
    return out


PLACE_OBJECTS = (("circle", "red"), ("square", "blue"), ("triangle", "green"), ("star", "yellow"))
# prompt pairs that differ only in the row word (top / bottom) or only in the column word (left / right)
PLACE_PAIRS = {"row": (((0, 0), (2, 0)), ((0, 2), (2, 2))), "column": (((0, 0), (0, 2)), ((2, 0), (2, 2)))}


@torch.no_grad()
def place_response(pipe, n_noise: int = 16, n_renders: int = 64, seed: int = 0) -> dict:
    """Does the UNet put the object where the caption says, at the noisiest timestep (where the layout is set)?

    For two prompts that differ only in the row word ("a red circle in the top left" / "... in the bottom left") or
    only in the column word ("... top left" / "... top right"), PLACE_OBJECTS x PLACE_PAIRS (8 pairs per word), it
    compares the difference of the UNet's x0 prediction at t = T - 1 from pure noise (the mean over n_noise draws,
    the same for both prompts) with the difference of the two prompts' mean latents (n_renders renders each,
    `render_prompts`, size drawn, encoded by the pipeline's VAE): at SNR ~ 0 the best x0 prediction is the prompt's
    mean latent, so a model that places like the data has cosine 1 and norm ratio 1, one that ignores the word ~0
    and ~0. Probe from the README's "Place is learnable from a clean target".

    Returns:
        {"row": {"cosine", "norm_ratio"}, "column": {...}}: means over each word's 8 pairs; the cosine of a zero model
        difference counts as 0.
    """
    from diffusers import DDPMScheduler

    from distill import x0_and_eps
    from generate_data import prompt_text, render_prompts

    device, unet = pipe.unet.device, pipe.unet
    alpha = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod[-1].to(device)
    t = pipe.scheduler.config.num_train_timesteps - 1
    size = pipe.vae_scale_factor * unet.config.sample_size  # the pipeline's image side
    noise = torch.randn(n_noise, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                        generator=torch.Generator().manual_seed(seed)).to(device)
    model, data = {}, {}  # per prompt (in one row and one column pair): mean predicted x0, mean latent
    for shape, color in PLACE_OBJECTS:
        for cell in {cell for pairs in PLACE_PAIRS.values() for pair in pairs for cell in pair}:
            prompt = {"objects": [{"shape": shape, "color": color, "size": None, "cell": list(cell)}], "relation": None}
            ids = tokenize(pipe.tokenizer, [prompt_text(prompt)]).to(device)
            out = unet(noise, torch.full((n_noise,), t, device=device),
                       pipe.text_encoder(ids)[0].expand(n_noise, -1, -1)).sample.float()
            model[shape, cell] = x0_and_eps(out, noise, alpha, pipe.scheduler.config.prediction_type)[0].mean(0)
            x = to_unit(torch.from_numpy(render_prompts([prompt] * n_renders, size=size)).permute(0, 3, 1, 2), device)
            data[shape, cell] = (pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor).float().mean(0)
    out = {}
    for word, pairs in PLACE_PAIRS.items():
        cosines, ratios = [], []
        for shape, _ in PLACE_OBJECTS:
            for a, b in pairs:
                moved, wanted = model[shape, a] - model[shape, b], data[shape, a] - data[shape, b]
                cosines.append(float(F.cosine_similarity(moved.flatten(), wanted.flatten(), 0, eps=1e-12)))
                ratios.append(float(moved.norm() / wanted.norm()))
        out[word] = {"cosine": round(float(np.mean(cosines)), 4), "norm_ratio": round(float(np.mean(ratios)), 4)}
    return out


def train_designs(args: argparse.Namespace, ckpt_root: Path) -> None:
    """Train every design for the same CPU time, --jobs at once, one thread each (resumable: a rerun continues or
    skips each one). Raises UserError naming the log of a design that fails."""
    import subprocess
    import sys

    def command(design: str) -> list[str]:
        folder = ckpt_root / design
        return [sys.executable, str(Path(__file__).resolve()), "--design", design, "--data", str(args.data),
                "--ckpt-dir", str(folder), "--out", str(folder / "final"), "--cpu-minutes", str(args.cpu_minutes),
                "--snapshot-cpu-minutes", ",".join(f"{m:g}" for m in args.eval_at), "--max-steps", str(10**7),
                "--lr-schedule", "constant", "--threads", "1", "--sample-every", "0", *args.extra.split()]

    todo = [d for d in args.designs if not (ckpt_root / d / "final" / "model_index.json").is_file()]
    running: dict = {}
    while todo or running:
        while todo and len(running) < args.jobs:
            design = todo.pop(0)
            (ckpt_root / design).mkdir(parents=True, exist_ok=True)
            log = open(ckpt_root / design / "train.log", "a")
            print(f"training {design} for {args.cpu_minutes} CPU-min (log: {log.name})")
            running[design] = (subprocess.Popen(command(design), stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(2)
        for design, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[design]
                check(proc.returncode == 0, f"design {design} failed (exit {proc.returncode}); see {log.name}")


def design_curve(design: str, folder: Path, args, prompts: dict, ceiling_prompts: dict, oracle, evals: Path,
                 fp: str) -> dict:
    """One trained design: its representation ceiling (autoencoder round trip) and its oracle learning curve."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae").float().eval()
    training = json.loads((folder / "final" / "training_log.json").read_text())
    curve = []
    for mark in args.marks:
        snap = folder / "snapshots" / f"cpu{mark:g}"
        check(snap.is_dir(), f"{design} has no snapshot at {mark} CPU-min in {snap}")
        curve.append(score_snapshot(snap, prompts, oracle, evals / f"{design}-{snap.name}-{fp}.json"))
        print(f"{design} @ {mark} CPU-min: single {curve[-1]['single']['all']:.3f}, two {curve[-1]['two']['all']:.3f}")
    return {"note": DESIGN_NOTES[design], "flags": DESIGNS[design],
            "representation_round_trip": round_trip(vae_round_trip(vae), ceiling_prompts, oracle),
            "params": training["params"], "steps": training["steps"],
            "steps_per_cpu_minute": round(training["steps"] / max(training.get("cpu_seconds", 1) / 60, 1e-9), 1),
            "curve": curve}


def final_point_info(final: Path, last_snapshot_step: int) -> dict | None:
    """Step and CPU-minutes of a run's final pipeline (its training_log.json), when it was trained past the last
    snapshot (`last_snapshot_step`); else None."""
    log_path = final / "training_log.json"
    if not ((final / "model_index.json").is_file() and log_path.is_file()):
        return None
    log = read_json(log_path)
    if log["steps"] <= last_snapshot_step:
        return None
    return {"step": log["steps"], "cpu_minutes": round(log.get("cpu_seconds", log["train_seconds"]) / 60, 2),
            "mark": "final", "design": log["config"].get("design")}


def continued_curve(ckpt_dir: Path, points: list[dict], oracle_sha: str, n_prompts: int) -> list[dict]:
    """A warm-started run's curve as its final pipeline's card shows it: the inherited points first (when they were
    scored by the same oracle on as many prompts; else left out), then this run's, its steps and CPU-minutes counted
    on from the warm start's. A run from scratch keeps its points."""
    path = ckpt_dir / "warm_start.json"
    if not path.is_file():
        return points
    ws = read_json(path)
    inherited = [{"run": ws["from"], **p} for p in ws.get("curve_points", [])
                 if ws.get("curve_oracle_sha256_12", oracle_sha) == oracle_sha
                 and ws.get("curve_n_prompts", n_prompts) == n_prompts]
    return inherited + [dict(p, step=p["step"] + ws["steps"], cpu_minutes=round(p["cpu_minutes"] + ws["cpu_seconds"]
                                                                                / 60, 2), run=ckpt_dir.name)
                        for p in points]


def write_learning_curve(folder: Path, design: dict, args: argparse.Namespace, argv, sub: str = "study") -> None:
    """learning_curve.json beside a design's final pipeline (shipped with it; `utils.model_card` turns it into the
    card's "Learning curve" section): per snapshot its step, CPU-minutes and oracle scores; `sub` is the
    train_diffusion.py subcommand that measured it (study or curve)."""
    from oracle import weights_sha

    keys = ("all", "all_ci", "shape", "color", "position", "count")
    write_json(folder / "learning_curve.json", {
        "command": f"python train_diffusion.py {sub} " + " ".join(shlex.quote(str(a)) for a in argv),
        "n_prompts": args.n_prompts, "oracle_sha256_12": weights_sha(args.oracle),
        "points": [{"step": p["step"], "cpu_minutes": p["cpu_minutes"], **({"run": p["run"]} if "run" in p else {}),
                    **{kind: {k: p[kind].get(k) for k in keys} for kind in ("single", "two")}}
                   for p in design["curve"]]})


def pick_winner(metrics: dict) -> None:
    """The design with the highest single + two-object all-correct at the last curve point (added to `metrics`)."""
    final = {d: m["curve"][-1] for d, m in metrics["designs"].items()}

    def partial(d):  # the attributes a design has learned so far, where all-correct is still 0 for every design
        return float(np.mean([final[d]["single"][k] or 0 for k in ("shape", "color", "position")]))

    metrics["winner"] = max(final, key=lambda d: (final[d]["single"]["all"] + final[d]["two"]["all"], partial(d)))
    metrics["winner_rule"] = ("highest single + two-object all-correct at the last curve point; ties broken by the "
                              "mean of single-object shape, colour and position")
    metrics["tied_on_all_correct"] = len({final[d]["single"]["all"] + final[d]["two"]["all"] for d in final}) == 1


def plot_curves(metrics: dict, n_prompts: int, path: Path) -> None:
    """fidelity_vs_cpu.png: one panel per (prompt kind, attribute), a line per design, CIs on all-correct."""
    from utils import pyplot

    plt = pyplot()
    panels = [("single", "all"), ("two", "all"), ("single", "shape"), ("single", "color"), ("single", "position")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), sharey=True)
    for ax, (kind, key) in zip(axes, panels):
        for design, m in metrics["designs"].items():
            xs = [p["cpu_minutes"] for p in m["curve"]]
            ys = [p[kind][key] or 0 for p in m["curve"]]
            err = None
            if key == "all":  # the CI of the headline number
                err = np.array([[y - p[kind]["all_ci"][0], p[kind]["all_ci"][1] - y] for y, p in zip(ys, m["curve"])]).T
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=design)
        ax.set(title=f"{kind}-object {key.replace('all', 'all-correct')}", xlabel="UNet CPU-minutes", ylim=(-0.02, 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"oracle fraction correct ({n_prompts} prompts)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study(argv) -> dict:
    """`python train_diffusion.py study`: equal-CPU-time learning curves of several designs, scored by the oracle."""
    from diffusers import AutoencoderKL

    from generate_data import make_prompts
    from oracle import Oracle, weights_sha

    args = parse_study_args(argv)
    run = start_run("design_study", args)
    ckpt_root = args.ckpt_root / args.run_name
    oracle = Oracle.load(args.oracle, torch.device("cpu"))
    prompts = {kind: make_prompts(kind, args.n_prompts, seed=0) for kind in ("single", "two")}
    ceiling_prompts = {kind: make_prompts(kind, args.n_prompts, seed=1) for kind in ("single", "two")}
    fp = weights_sha(args.oracle)

    # 1. reference ceilings (issue 10, facts 1 and 2): the shipped autoencoder, and 32 px with a fixed upsampler
    metrics: dict = {"cpu_minutes": args.cpu_minutes, "eval_at": list(args.marks), "n_prompts": args.n_prompts,
                     "oracle": str(args.oracle), "oracle_sha256_12": fp, "references": {}, "designs": {}}
    with run.step("references"):
        if (args.reference_model / "vae" / "config.json").is_file():
            vae = AutoencoderKL.from_pretrained(args.reference_model / "vae").float().eval()
            metrics["references"]["shipped_autoencoder"] = round_trip(vae_round_trip(vae), ceiling_prompts, oracle)
        metrics["references"]["pixels_32_bicubic"] = round_trip(resample_round_trip(32), ceiling_prompts, oracle)

    # 2. train every design for the same CPU time (resumable: a rerun continues or skips each one)
    with run.step("train"):
        train_designs(args, ckpt_root)

    # 3. each design: its representation ceiling and its curve; the winner
    with run.step("score"):
        for design in args.designs:
            metrics["designs"][design] = design_curve(design, ckpt_root / design, args, prompts, ceiling_prompts,
                                                      oracle, run.dir / "evals", fp)
            write_learning_curve(ckpt_root / design / "final", metrics["designs"][design], args, argv)
    pick_winner(metrics)

    # 4. figure and table, then metrics and `latest`
    plot_curves(metrics, args.n_prompts, run.dir / "fidelity_vs_cpu.png")
    write_text(run.dir / "results.md", study_markdown(metrics))
    run.finish(metrics)
    print(study_markdown(metrics))
    return metrics


def study_markdown(m: dict) -> str:
    refs = m["references"]
    lines = [f"# Design study: {len(m['designs'])} designs, {m['cpu_minutes']:g} UNet CPU-minutes each", "",
             f"Oracle all-correct on {m['n_prompts']} single- and {m['n_prompts']} two-object prompts (DPM-Solver++ "
             "20 steps, CFG 5, one image per prompt, 95% bootstrap CI). Ceiling: renders of the same kind of prompts "
             "after the design's autoencoder round trip (posterior mean).", "",
             "| design | ceiling single / two | CPU-min | steps | single all-correct | two all-correct | "
             "single shape / colour / position |", "|---|---|---|---|---|---|---|"]
    for design, d in m["designs"].items():
        rt = d["representation_round_trip"]
        for p in d["curve"]:
            s, t = p["single"], p["two"]
            lines.append(f"| {design} | {fmt(rt['single'])} / {fmt(rt['two'])} | {p['cpu_minutes']:.1f} | {p['step']} "
                         f"| {fmt(s['all'])} {fmt_ci(s['all_ci'])} | {fmt(t['all'])} {fmt_ci(t['all_ci'])} | "
                         f"{fmt(s['shape'])} / {fmt(s['color'])} / {fmt(s['position'])} |")
    lines += ["", "References (no UNet): " + "; ".join(f"{k}: single {fmt(v['single'])}, two {fmt(v['two'])}"
                                                      for k, v in refs.items()),
              "", f"Winner ({m['winner_rule']}): **{m['winner']}**.", "",
              *[f"- {d}: {v['note']}" for d, v in m["designs"].items()], "", "![fidelity vs CPU](fidelity_vs_cpu.png)"]
    return "\n".join(lines) + "\n"


def ceiling(argv) -> dict:
    """`python train_diffusion.py ceiling --vae FOLDER[,FOLDER...]`: each autoencoder's representation ceiling, the
    oracle all-correct rate of rendered prompts after an encode/decode round trip (posterior mean), as the study
    measures it (issue 10, fact 1), for autoencoders trained outside a study (e.g. with more `--vae-steps`).
    Writes outputs/design_study_ceiling/<run>/metrics.json."""
    from diffusers import AutoencoderKL

    from generate_data import make_prompts
    from oracle import DEFAULT_ORACLE, Oracle, weights_sha

    parser = argparse.ArgumentParser(prog="train_diffusion.py ceiling", description=ceiling.__doc__.split("\n")[0])
    parser.add_argument("--vae", type=comma_list(Path), required=True,
                        help="comma-separated AutoencoderKL folders (a checkpoint's vae/ or a pipeline's vae/)")
    parser.add_argument("--n-prompts", type=int, default=200, help="prompts per kind (single, two) (> 0)")
    parser.add_argument("--oracle", type=Path, default=DEFAULT_ORACLE, help="oracle folder")
    common_args(parser, "design_study_ceiling", omit=("device", "threads", "seed", "quick"))
    args = parse_checked(parser, argv)
    check(args.n_prompts > 0, f"--n-prompts must be > 0, got {args.n_prompts}")
    for folder in args.vae:
        check((folder / "config.json").is_file(), f"autoencoder not found: {folder} (no config.json)")
    run = start_run("design_study_ceiling", args)
    oracle = Oracle.load(args.oracle, torch.device("cpu"))
    prompts = {kind: make_prompts(kind, args.n_prompts, seed=1) for kind in ("single", "two")}
    metrics: dict = {"n_prompts": args.n_prompts, "oracle_sha256_12": weights_sha(args.oracle), "autoencoders": {}}
    for folder in args.vae:
        with run.step(str(folder)):
            vae = AutoencoderKL.from_pretrained(folder).float().eval()
            info = vae_info_path(folder)
            metrics["autoencoders"][str(folder)] = {
                "round_trip": round_trip(vae_round_trip(vae), prompts, oracle),
                "training": {k: v for k, v in read_json(info).items() if k != "loss_curve"} if info else None}
        print(f"{folder}: round-trip all-correct {metrics['autoencoders'][str(folder)]['round_trip']}")
    run.finish(metrics)
    return metrics


def caption_use_cli(argv) -> dict:
    """`python train_diffusion.py caption-use --model NAME[,NAME...]`: how much each pipeline's UNet reads the caption
    and, for a UNet that also pools it (--text-film), through which path: `caption_use` on renders of the first
    --n-prompts of the study's 200 single-object prompts (seed 0), as the learning curve does. NAME is a registry name
    or a pipeline folder (a snapshot, a final). Writes outputs/caption_use/<run>/{metrics.json,results.md}."""
    from generate_data import make_prompts
    from utils import load_pipeline, resolve_model

    parser = argparse.ArgumentParser(prog="train_diffusion.py caption-use",
                                     description=caption_use_cli.__doc__.split("\n")[0])
    parser.add_argument("--model", type=comma_list(), required=True,
                        help="comma-separated registry names or pipeline folders, e.g. shapes-tiny-f2,checkpoints/R/final")
    parser.add_argument("--n-prompts", type=int, default=32, help="single-object prompts rendered and noised (> 0)")
    parser.add_argument("--timesteps", type=comma_list(int), default="200,500,800",
                        help="training timesteps at which the losses are compared, each in 0..999")
    common_args(parser, "caption_use", omit=("device", "seed", "quick"))
    args = parse_checked(parser, argv)
    check(args.n_prompts > 0, f"--n-prompts must be > 0, got {args.n_prompts}")
    check(args.timesteps and all(0 <= t <= 999 for t in args.timesteps),
          f"--timesteps must be in 0..999, got {args.timesteps}")
    for name in args.model:  # an unknown name fails before the first model is measured
        resolve_model(name)
    if args.threads:
        set_threads(args.threads)
    run = start_run("caption_use", args)
    prompts = make_prompts("single", max(200, args.n_prompts), seed=0)[:args.n_prompts]  # the curve's 32 first
    metrics: dict = {"n_prompts": args.n_prompts, "models": {}}
    rows = []
    for name in args.model:
        with run.step(name):
            pipe, _ = load_pipeline(name, device=torch.device("cpu"), dtype=torch.float32)
            reads = caption_use(pipe, prompts, timesteps=tuple(args.timesteps))
        metrics["models"][name] = reads
        for t, r in reads.items():
            rows.append([name, t[1:], f"{r['ratio']:.4f}", *(f"{r[k]:.4f}" if k in r else "–"
                                                            for k in ("xattn_ratio", "pooled_ratio"))])
    table = md_table(["model", "timestep", "caption use (shuffled / own)", "cross-attention only shuffled / own",
                      "pooled path only shuffled / own"], rows)
    write_text(run.dir / "results.md", "# Caption use\n\nThe UNet's denoising loss on renders of single-object "
               "prompts with another prompt's caption over the loss with the image's own (1.000: ignored); for a UNet "
               "that also pools the caption into the timestep embedding (--text-film), the same with only "
               "cross-attention or only the pooled path reading the other caption (`train_diffusion.caption_use`). "
               "Only cross-attention can say where an object goes.\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))
    run.finish(metrics)
    return metrics


def curve(argv) -> dict:
    """`python train_diffusion.py curve --ckpt-dir DIR`: the learning curve of one training run. Scores every EMA
    snapshot in DIR/snapshots (saved by --snapshot-cpu-minutes) with the oracle on the study's prompts (each score
    cached in its snapshot folder), writes learning_curve.json into the run's final pipeline when it has one, and
    outputs/learning_curve/<run>/{metrics.json,results.md,fidelity_vs_cpu.png}. Raises UserError when DIR holds no
    snapshot."""
    from generate_data import make_prompts
    from oracle import DEFAULT_ORACLE, Oracle, weights_sha

    parser = argparse.ArgumentParser(prog="train_diffusion.py curve", description=curve.__doc__.split("\n")[0])
    parser.add_argument("--ckpt-dir", type=Path, required=True, help="a training run's checkpoint folder")
    parser.add_argument("--final", type=Path, default=None,
                        help="pipeline folder that gets learning_curve.json (default: <ckpt-dir>/final, when it "
                             "exists)")
    parser.add_argument("--n-prompts", type=int, default=200, help="prompts per kind (single, two) per point (> 0)")
    parser.add_argument("--oracle", type=Path, default=DEFAULT_ORACLE, help="oracle folder")
    parser.add_argument("--marks", type=comma_list(float), default="",
                        help="score only the snapshots of these --snapshot-cpu-minutes marks, e.g. 20,45 (default: all)")
    common_args(parser, "learning_curve", omit=("seed", "quick"))
    args = parse_checked(parser, argv)
    check(args.n_prompts > 0, f"--n-prompts must be > 0, got {args.n_prompts}")
    snaps = sorted((p for p in (args.ckpt_dir / "snapshots").glob("*") if (p / "snapshot.json").is_file()),
                   key=lambda p: read_json(p / "snapshot.json")["cpu_minutes"])
    check(snaps, f"no snapshots in {args.ckpt_dir / 'snapshots'} (train with --snapshot-cpu-minutes)")
    if args.marks:
        have = {read_json(p / "snapshot.json")["mark"]: p for p in snaps}
        missing = [m for m in args.marks if m not in have]
        check(not missing, f"--marks {missing} have no snapshot in {args.ckpt_dir / 'snapshots'}; it has "
                           f"{sorted(have)}")
        snaps = [p for p in snaps if read_json(p / "snapshot.json")["mark"] in args.marks]
    if args.threads:
        set_threads(args.threads)
    device = pick_device(args.device)
    run = start_run("learning_curve", args)
    oracle = Oracle.load(args.oracle, torch.device("cpu"))
    prompts = {kind: make_prompts(kind, args.n_prompts, seed=0) for kind in ("single", "two")}
    fp = weights_sha(args.oracle)
    final = args.final or args.ckpt_dir / "final"
    jobs = [(snap, snap.name, snap / f"oracle-{fp}-n{args.n_prompts}.json", None) for snap in snaps]
    last = final_point_info(final, read_json(snaps[-1] / "snapshot.json")["step"])
    if last and not args.marks:  # training went on past the last snapshot: its final weights end the curve
        jobs.append((final, "final", args.ckpt_dir / f"final-step{last['step']}-oracle-{fp}-n{args.n_prompts}.json",
                     last))
    points = []
    for folder, label, cache, info in jobs:
        with run.step(label):
            points.append(score_snapshot(folder, prompts, oracle, cache, device, info))
        p = points[-1]
        print(f"{label} (step {p['step']}, {p['cpu_minutes']} CPU-min): all-correct single {p['single']['all']:.3f}"
              f" / two {p['two']['all']:.3f}; single shape {p['single']['shape']:.3f}, colour "
              f"{p['single']['color']:.3f}, position {p['single']['position']:.3f}; caption use (shuffled / own "
              f"loss at t=500) {p['caption_use']['t500']['ratio']:.3f}{xattn_note(p)}; text encoder word separation "
              + ", ".join(f"{k} {v:.3f}" for k, v in p["word_separation"].items())
              + "; place response (cosine / norm ratio) " + ", ".join(
                  f"{word} {r['cosine']:.3f} / {r['norm_ratio']:.3f}" for word, r in p["place_response"].items()))
    name = args.ckpt_dir.name
    metrics = {"ckpt_dir": str(args.ckpt_dir), "n_prompts": args.n_prompts, "oracle_sha256_12": fp,
               "designs": {name: {"curve": points}}}
    if (final / "model_index.json").is_file():
        write_learning_curve(final, {"curve": continued_curve(args.ckpt_dir, points, fp, args.n_prompts)}, args, argv,
                             sub="curve")
        metrics["learning_curve_json"] = str(final / "learning_curve.json")
    plot_curves(metrics, args.n_prompts, run.dir / "fidelity_vs_cpu.png")
    rows = [[f"{p['cpu_minutes']:g}", p["step"],
             *(fmt_est({"mean": p[kind]["all"], "ci95": p[kind]["all_ci"]}) for kind in ("single", "two")),
             " / ".join(f"{p['single'][k]:.3f}" for k in ("shape", "color", "position")),
             " / ".join(f"{p['caption_use'][t]['ratio']:.3f}" for t in ("t200", "t500", "t800")),
             " / ".join(f"{p['caption_use'][t]['xattn_ratio']:.3f}" if "xattn_ratio" in p["caption_use"][t] else "–"
                        for t in ("t200", "t500", "t800")),
             " / ".join(f"{p['word_separation'][k]:.3f}" for k in ("position", "color", "shape")),
             ", ".join(f"{r['cosine']:.3f} / {r['norm_ratio']:.3f}" for r in p["place_response"].values())]
            for p in points]
    write_text(run.dir / "results.md", f"# Learning curve of {args.ckpt_dir}\n\nOracle all-correct on "
               f"{args.n_prompts} single- and {args.n_prompts} two-object prompts (DPM-Solver++ 20 steps, CFG 5, "
               "95% bootstrap CI). Caption use: the UNet's loss with shuffled captions over its loss with each "
               "image's own caption on 32 single-object renders at timesteps 200 / 500 / 800 (1.000: the caption is "
               "ignored; `caption_use`); its cross-attention share, for a UNet that also pools the caption "
               "(--text-film): the loss with only cross-attention reading shuffled captions over the own loss (1.000: "
               "cross-attention, the only path that can say where, is ignored). Word separation: how far the text "
               "encoder's hidden states move when one word of the prompt changes (`word_separation`; near 0: the UNet "
               "cannot read that attribute). Place response: at t = T - 1, the cosine and norm ratio of the UNet's "
               "x0 difference between two prompts that differ only in the row (resp. column) word against the "
               "difference of their mean latents (`place_response`; 1 / 1: places like the data, 0 / 0: the word is "
               "ignored).\n\n"
               + "\n".join(md_table(
                   ["CPU-min", "step", "single all-correct", "two all-correct", "single shape / colour / position",
                    "caption use t200 / t500 / t800", "cross-attention use t200 / t500 / t800",
                    "word separation position / colour / shape",
                    "place response row, column (cosine / norm ratio)"], rows)) + "\n")
    run.finish(metrics)
    return metrics


def main(argv=None) -> dict:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["study"]:
        return study(argv[1:])
    if argv[:1] == ["ceiling"]:
        return ceiling(argv[1:])
    if argv[:1] == ["curve"]:
        return curve(argv[1:])
    if argv[:1] == ["caption-use"]:
        return caption_use_cli(argv[1:])
    # 1. arguments, device, checkpoint folder
    args = parse_args(argv)
    wall_start = time.time()
    deadline = wall_start + 60 * args.max_minutes if args.max_minutes else float("inf")
    if args.threads:
        set_threads(args.threads)
    device = pick_device(args.device)
    set_seed(args.seed)  # for library code we do not control; our own draws use explicit generators
    if args.fresh and args.ckpt_dir.exists():
        shutil.rmtree(args.ckpt_dir)
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)

    # 2. images, captions, tokenizer
    images, captions, eval_images, boxes, names, objects = load_images_and_captions(args)
    check(not args.stf_reference or any(len(o) == 1 for o in objects),
          "--stf-reference needs single-object images with the shapes world's object attributes ('objects' in the "
          "data); this data has none")
    if args.init_text:
        adopt_text_encoder(args)
    check_architecture(args)
    tokenizer = build_tokenizer(captions, args.ckpt_dir / "tokenizer")

    if args.decoder_minutes:  # a side job beside the main training: decoder only, then exit
        info = finetune_decoder(args, images, eval_images, device)
        print(f"decoder: {info['decoder_finetune_steps']} fine-tuning steps in total, PSNR {info['psnr_db']} dB")
        return info

    # 3. autoencoder, then the latents of every training image
    vae, vae_info = train_vae(args, images, eval_images, device, deadline)
    print(f"autoencoder: {vae_info.get('steps', '?')} steps, PSNR {vae_info.get('psnr_db', '?')} dB"
          + (f" (from {vae_info['init_from']})" if "init_from" in vae_info else ""))
    latents = encode_latents(args, vae, images, device)
    references = reference_latents(args, vae, images.shape[-1], device) if args.stf_rendered else None
    mirror = mirror_data(args, vae, images, captions, names, device) if args.mirror_pairs else None
    need_masks = args.object_weight or args.grounding_loss
    masks = object_masks(boxes, images.shape[-1], latents["mean"].shape[-1]) if need_masks else None
    single = torch.tensor([len(b) == 1 for b in boxes])
    check(not args.grounding_loss or bool(single.any()),
          "--grounding-loss needs single-object training images with boxes (COCO bboxes); the data has none")
    del images

    # 4. text encoder + UNet
    trainer = Trainer(args, tokenizer, vae, latents, captions, device, masks, single, mirror, objects, references)
    trainer.run(deadline)

    # 5. pipeline, model card, training log
    info = finish(trainer, args, vae_info, len(captions), device, wall_start)
    print(f"saved {args.out}: {trainer.step} steps in {trainer.seconds / 60:.1f} min, "
          f"{sum(info['params'].values()) / 1e6:.2f} M parameters")
    return info


if __name__ == "__main__":
    cli(main)
