"""Speech: audio utilities, VAD, ASR, TTS and the duplex turn-taking state machine."""
