"""The engine: config, events, sessions, LLM backends, storage.

Heavy libraries (torch, transformers) are imported inside the backends that
need them, so `import engine` stays cheap.
"""
