"""Builders of tiny, randomly initialised pipelines saved in diffusers layouts (for tests and docs; no downloads).

``tiny_dit_pipeline(folder)`` writes a DiTPipeline layout (optionally with a tiny VAE, i.e. latent space, as
facebook/DiT-XL-2 has); ``tiny_pixart_pipeline(folder)`` a PixArtAlphaPipeline layout with a tiny T5 encoder and a
word-level tokenizer. ``dit_xl_2_config()`` is the transformer config of facebook/DiT-XL-2-256.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def dit_xl_2_config() -> dict:
    """The DiTTransformer2DModel config of facebook/DiT-XL-2-256 (latent 32×32×4, learned σ, 1000 classes)."""
    return dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def _scheduler_config(folder: Path) -> None:
    from diffusers import DDIMScheduler

    DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False).save_pretrained(folder / "scheduler")


def _tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=16)


def tiny_dit_pipeline(folder: str | Path, *, with_vae: bool = False, num_classes: int = 10, seed: int = 0) -> Path:
    """A random DiT (2 blocks, hidden 64) in DiTPipeline layout; pixel space 16×16×3, or latent 8×8×4 with a VAE."""
    from diffusers import DiTTransformer2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    channels, size = (4, 8) if with_vae else (3, 16)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=channels, out_channels=channels * 2 if with_vae else channels,
                                  num_layers=2, sample_size=size, patch_size=2, num_embeds_ada_norm=num_classes)
    for p in model.parameters():  # adaLN-zero starts at zero; perturb so outputs depend on every weight
        torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(folder / "transformer")
    _scheduler_config(folder)
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"], "scheduler": ["diffusers", "DDIMScheduler"],
             "vae": ["diffusers", "AutoencoderKL"] if with_vae else [None, None],
             "id2label": {str(i): f"class{i}" for i in range(num_classes)}}
    if with_vae:
        _tiny_vae(channels).save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def tiny_pixart_pipeline(folder: str | Path, *, seed: int = 0) -> Path:
    """A random PixArt-α (2 blocks, hidden 64, cross-attention to a 2-layer T5 of width 32) with a tiny VAE."""
    from diffusers import PixArtTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    folder = Path(folder)
    torch.manual_seed(seed)
    words = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "green", "circle", "square", "star", "on", "the", "big", "small"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=16)
    tokenizer.save_pretrained(folder / "tokenizer")
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1)).save_pretrained(folder / "text_encoder")
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
                                     cross_attention_dim=64, caption_channels=32, sample_size=8, patch_size=2, norm_num_groups=8)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(folder / "transformer")
    _tiny_vae(4).save_pretrained(folder / "vae")
    _scheduler_config(folder)
    index = {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"], "scheduler": ["diffusers", "DDIMScheduler"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
