"""Prompt encoding of the SD3 / SD3.5 family, exactly as diffusers' StableDiffusion3Pipeline.encode_prompt.

Three text encoders (Esser et al. 2024, Sec. 5.2): CLIP-L/14 and OpenCLIP bigG/14, both with their
projections, and T5 v1.1 XXL, which may be left out (the authors' Flash SD3 recipe does, and so does
anyone short of memory: SD3 was trained with each encoder dropped at random, so it works without it).

    CLIP-L penultimate states (B, 77, 768) ++ bigG's (B, 77, 1280)     -> (B, 77, 2048) along channels
    zero-padded to T5's width 4096                                      -> (B, 77, 4096)
    ++ T5's last hidden state (B, 256, 4096) along the tokens           -> context (B, 333, 4096)
    pooled = CLIP-L projection (768) ++ bigG projection (1280)          -> (B, 2048)

Reproduced on purpose: the penultimate CLIP layers (hidden_states[-2], before the final LayerNorm) but
the projected pooled vectors (after it); T5 runs without an attention mask (its pads are attended), on
256 tokens; without T5 its part is zeros of the same shape, so the context keeps 333 tokens. The same
prompt goes to all three encoders (diffusers' prompt_2 / prompt_3 are not exposed).
"""
import torch
import torch.nn.functional as F


def encode_sd3(text_encoders, tokenizers, texts, width, max_length=256):
    """texts (list of str) -> (context (B, 77 + max_length, width), pooled (B, 2048)).

    text_encoders / tokenizers: [CLIP-L, bigG] and optionally T5, in any order after the CLIPs' own
    (CLIP-L before bigG); T5 is told from the CLIPs by its tokenizer's kind. width: the transformer's
    joint_attention_dim, the width of the zeros that stand in for T5 when it is absent."""
    clip_states, pooled, t5 = [], [], None
    for enc, tok in zip(text_encoders, tokenizers):
        if tok.kind == "t5":
            t5 = enc, tok
            continue
        if enc.text_projection is None:
            raise ValueError("SD3 pipeline: each CLIP text encoder needs a projection "
                             "(CLIPTextModelWithProjection) for the pooled text embedding")
        ids, _ = tok(texts)  # 77 tokens, the tokenizer's own length
        out = enc(ids.to(next(enc.parameters()).device))
        clip_states.append(out.penultimate_hidden_state)
        pooled.append(out.pooled)
    if len(clip_states) != 2:
        raise ValueError(f"SD3 pipeline: needs 2 CLIP text encoders (CLIP-L, bigG), found {len(clip_states)}")
    clip_states = torch.cat(clip_states, dim=-1)
    if t5 is None:
        t5_states = clip_states.new_zeros(len(texts), max_length, width)
    else:
        enc, tok = t5
        ids, _ = tok(texts, max_length=max_length)
        t5_states = enc(ids.to(next(enc.parameters()).device)).to(clip_states.device, clip_states.dtype)
    clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
    return torch.cat([clip_states, t5_states], dim=1), torch.cat(pooled, dim=-1)
