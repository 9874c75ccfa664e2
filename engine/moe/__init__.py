"""Mixture-of-experts support: find MoE blocks (families.py), offload experts
behind an LRU cache (offload.py), and record which experts fired (stats.py)."""
