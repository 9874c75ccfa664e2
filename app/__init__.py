"""The outside world: browser UI, HTTP API and terminal chat over the engine."""
