"""Perception: attached media -> what the LLM can use (DESIGN.md, Perception).

`understand.py` is the glue a turn calls (transcribe, perceive, say what cannot be
read); `perceiver.py` picks and caches the adapters; one adapter file per kind of
media: `image_tools`, `audio_tools`, `video_tools` (classical and small offline
models), `neural` (a vision-language model); `base.py` is their contract.
"""
