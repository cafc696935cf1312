"""Wan2.1 video: model loading / LoRA / widening / keyframe rotary (``wan``), streaming latent
shards and DiDeMo videos (``data``), synthetic shards (``make_shards``), the VAE + text-encoder
cache (``precompute_cache``). Submodules import diffusers lazily; import them directly."""
