"""Loading original checkpoints (safetensors only). These entry points are public API: keep them stable."""
from weights.io import CheckpointError, read_safetensors, read_weights, write_safetensors


def load_tokenizer(folder, **kw):
    from flash.tokenizer import load_tokenizer as f
    return f(folder, **kw)


def load_text_encoder(folder, **kw):
    from weights.text import load_text_encoder as f
    return f(folder, **kw)


def load_unet(folder, **kw):
    from weights.sd import load_unet as f
    return f(folder, **kw)


def load_vae(folder, **kw):
    from weights.sd import load_vae as f
    return f(folder, **kw)


def load_adapter(folder, **kw):
    from weights.sd import load_adapter as f
    return f(folder, **kw)


def load_transformer(folder, **kw):
    from weights.pixart import load_transformer as f
    return f(folder, **kw)


def load_pipeline(path, **kw):
    from weights.pipeline import load_pipeline as f
    return f(path, **kw)


def save_pipeline(pipe, folder, **kw):
    from weights.save import save_pipeline as f
    return f(pipe, folder, **kw)


__all__ = ["CheckpointError", "read_safetensors", "read_weights", "write_safetensors", "load_tokenizer",
           "load_text_encoder", "load_unet", "load_vae", "load_adapter", "load_transformer", "load_pipeline", "save_pipeline"]
