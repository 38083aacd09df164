"""Loaders for external checkpoint formats (safetensors only) and the savers that write them back. These
re-exports are the public API: keep them stable."""
from flash.io import CheckpointError, read_safetensors, read_weights, write_safetensors
from flash.tokenizer import load_tokenizer
from weights.clip_vision import load_clip_text, load_image_encoder
from weights.pipeline import load_pipeline, load_pipeline_with_loras
from weights.pixart import load_transformer
from weights.save import save_pipeline
from weights.sd3 import load_mmdit
from weights.sd import load_adapter, load_tiny_vae, load_unet, load_vae
from weights.text import load_text_encoder

__all__ = ["CheckpointError", "read_safetensors", "read_weights", "write_safetensors", "load_tokenizer",
           "load_text_encoder", "load_image_encoder", "load_clip_text", "load_unet", "load_vae", "load_tiny_vae",
           "load_adapter", "load_transformer", "load_mmdit", "load_pipeline", "load_pipeline_with_loras", "save_pipeline"]
