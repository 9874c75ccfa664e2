"""Tools: plan a call from a message (plan.py), run it on a generator backend (run.py: the
one path for a chat turn, /v1/images and the CLI), and the engine's voice as a sound tool
(speech_tool.py)."""
