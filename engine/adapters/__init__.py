"""Modality adapters: media in, something the LLM can use out (DESIGN.md, Modality adapters)."""
