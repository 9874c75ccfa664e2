"""A live voice conversation: microphone audio in, events and paced speech out.

Transport-agnostic (the browser WebSocket in app/voice.py and bench/voice.py
drive it the same way). The duplex state machine (duplex.py) decides when an
utterance ends and when the user barges in; each utterance becomes a turn
(ASR -> LLM -> streamed TTS) on one worker thread, started speculatively at
the first likely end of the utterance (a short pause) and kept back until the
end is certain, dropped if the user goes on; the answer's audio is
released at real-time pace with a short lead, so a barge-in stops it at once
(nothing long is buffered on the client) and the echo guard sees, as its
reference, what is really playing.
"""
from __future__ import annotations

import queue
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np

from engine.events import AudioChunk, CancelToken, Done, Error, Event, Transcript, VoiceState
from engine.session import Gate, Session
from engine.speech.audio import WHISPER_RATE, StreamResampler, resample, to_mono_float32, write_wav

LEAD_S = 0.25  # audio sent ahead of the playback clock: the most a barge-in can leave playing
SLICE_S = 0.04  # paced slice size


class Pacer:
    """Releases audio at real-time pace, at most LEAD_S ahead of playback."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.pending: deque[AudioChunk] = deque()
        self.play_until = 0.0  # when what was released so far ends playing
        self.inflight: deque[tuple[float, AudioChunk]] = deque()  # released: (end time, chunk)
        self.held = False

    def add(self, chunk: AudioChunk) -> None:
        step = int(chunk.sample_rate * SLICE_S) * 2
        for i in range(0, len(chunk.pcm), step):
            self.pending.append(AudioChunk(chunk.pcm[i:i + step], chunk.sample_rate))

    def due(self) -> list[AudioChunk]:
        now, out = self.clock(), []
        self.play_until = max(self.play_until, now)
        while self.inflight and self.inflight[0][0] <= now:
            self.inflight.popleft()
        while self.pending and not self.held and self.play_until - now < LEAD_S:
            chunk = self.pending.popleft()
            self.play_until += len(chunk.pcm) / 2 / chunk.sample_rate
            self.inflight.append((self.play_until, chunk))
            out.append(chunk)
        return out

    def hold(self) -> None:
        """Pause: what was sent but not yet played goes back to the front of the queue."""
        now = self.clock()
        unplayed = [chunk for end, chunk in self.inflight if end > now]
        self.pending.extendleft(reversed(unplayed))
        self.inflight.clear()
        self.play_until, self.held = now, True

    def resume(self) -> None:
        self.held = False

    def flush(self) -> None:
        self.pending.clear()
        self.inflight.clear()
        self.play_until, self.held = self.clock(), False

    @property
    def playing(self) -> bool:
        return bool(self.pending) or self.play_until > self.clock()

    @property
    def sounding(self) -> bool:
        """Audio is audible right now (released and not finished)."""
        return not self.held and self.play_until > self.clock()


class VoiceSession:
    def __init__(self, engine, send: Callable[[Event], None], conversation_id: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from engine.speech import duplex

        self._d = duplex
        self.engine, self.send, self.clock = engine, send, clock
        self.session = Session(engine, conversation_id)
        for role in ("vad", "asr", "tts", "llm"):
            engine.roles[role].get()  # raises Unavailable, with what to set, before the mic opens
        self.duplex = duplex.Duplex(engine.roles["vad"].get(), engine.config.vad)
        self.duplex.start_listening()
        self.pacer = Pacer(clock)
        self._resamplers: dict[int, StreamResampler] = {}
        self._lock = threading.RLock()
        self._turns: queue.Queue = queue.Queue()
        self._cancel: CancelToken | None = None
        self._draft: tuple[Gate, CancelToken] | None = None  # the answer being prepared speculatively
        self._held: list[Event] = []  # its events, until the utterance really ends
        self._open_turns = 0  # utterances queued or being answered
        self._last_state = ""
        self._last_answer = 0  # turn id of the latest stored answer
        self.marks: dict[str, float] = {}  # timestamps for latency measurement
        self.turn_marks: dict[str, float] = {}  # when the running turn first made each event type (held or not)
        self._carry = b""  # the odd bytes of a frame that split a sample: the next frame's start
        self._worker = threading.Thread(target=self._run_turns, name="voice-turns", daemon=True)
        self._worker.start()
        self._state("listening", "microphone open")

    @property
    def conversation_id(self) -> str | None:
        return self.session.id

    def feed(self, pcm, sample_rate: int, channels: int = 1) -> None:
        """Microphone audio (any rate, int16 bytes or an array). Bytes are a stream: a frame may
        end inside a sample, whose rest then starts the next one."""
        if isinstance(pcm, (bytes, bytearray, memoryview)):
            pcm = self._carry + bytes(pcm)
            whole = len(pcm) // (2 * channels) * (2 * channels)
            pcm, self._carry = pcm[:whole], pcm[whole:]
        if sample_rate not in self._resamplers:
            self._resamplers[sample_rate] = StreamResampler(sample_rate, WHISPER_RATE)
        x = self._resamplers[sample_rate](to_mono_float32(pcm, channels))
        d = self._d
        with self._lock:
            actions = self.duplex.feed(x)
        for action in actions:
            if isinstance(action, d.EndLikely):
                self.marks["speculated"] = self.clock()
                with self._lock:
                    self._draft = (Gate(), CancelToken())
                    self._turns.put((action.audio, *self._draft))
            elif isinstance(action, d.SpeechResumed):
                self._drop_draft("you went on speaking")
            elif isinstance(action, d.SpeechOnset):
                with self._lock:
                    self.pacer.hold()
                self.marks["audio_stopped"] = self.clock()
                self._state("paused", "you may be speaking")
            elif isinstance(action, d.OnsetRejected):
                with self._lock:
                    self.pacer.resume()
                self._state("speaking", "resuming")
            elif isinstance(action, d.BargeIn):
                self.marks["barge_in"] = self.clock()
                self.interrupt("you started speaking")
            elif isinstance(action, d.SpeechStarted):
                self._state("hearing", "speech started")
            elif isinstance(action, d.UtteranceEnded):
                self.marks["utterance_end"] = self.clock()
                with self._lock:
                    self.duplex.thinking()
                    self._open_turns += 1
                    self._state("thinking", "utterance ended")
                    if self._draft is not None:  # (only silence came after the pause: the draft stands)
                        self._draft[0].decide(True)
                        self._draft = None
                        held, self._held = self._held, []
                        for event in held:
                            self._deliver(event)
                    else:
                        self._turns.put((action.audio, None, CancelToken()))
        self.pump()

    def _drop_draft(self, reason: str) -> None:
        with self._lock:
            if self._draft is not None:
                gate, cancel = self._draft
                gate.decide(False)
                cancel.cancel(reason)
                self._draft, self._held = None, []

    def _route(self, event: Event, gate: Gate | None) -> None:
        """A turn's event: delivered, or held while its utterance may go on."""
        with self._lock:
            self.turn_marks.setdefault(event.type, self.clock())
            decided = True if gate is None else gate.poll()
            if decided is None and isinstance(event, Transcript) and self._draft is not None \
                    and self._draft[0] is gate:  # a finished sentence ends the turn sooner
                self.duplex.transcript_hint(event.text)
            if decided:
                self._deliver(event)
            elif decided is None:
                self._held.append(event)

    def _deliver(self, event: Event) -> None:
        if isinstance(event, AudioChunk):
            if self._cancel is None or not self._cancel.cancelled:
                self.pacer.add(event)
        else:
            self.send(event)
        if isinstance(event, Done):
            self._last_answer = event.turn_id

    def pump(self) -> None:
        """Release due audio to the client and tell the duplex what is playing."""
        with self._lock:
            for chunk in self.pacer.due():
                if "first_audio" not in self.marks:
                    self.marks["first_audio"] = self.clock()
                ref = np.frombuffer(chunk.pcm, dtype="<i2").astype(np.float32) / 32767.0
                self.duplex.playing(resample(ref, chunk.sample_rate, WHISPER_RATE))
                if self._last_state != "speaking":
                    self._state("speaking", "answer audio")
                self.send(chunk)
            if not self._open_turns and not self.pacer.playing and self.duplex.state.name in ("SPEAKING", "THINKING"):
                self.duplex.playback_done()
                self._state("listening", "answer done")

    def interrupt(self, reason: str = "stopped") -> None:
        """Stop speaking at once and cancel the running turn (LLM and TTS)."""
        with self._lock:
            was_playing, was_held = self.pacer.playing or self.pacer.held, self.pacer.held
            self.pacer.flush()
            if self._cancel is not None:
                self._cancel.cancel(reason)
            elif was_playing and self._last_answer:  # written in full, cut off while being spoken
                self.engine.store.set_status(self._last_answer, "interrupted")
        if not was_held:  # (when held, the audio already stopped at the onset)
            self.marks["audio_stopped"] = self.clock()
        self.marks["cancelled"] = self.clock()
        self._state("interrupted", reason)

    def close(self) -> None:
        self._drop_draft("voice mode closed")
        self.interrupt("voice mode closed")
        self._turns.put(None)
        self._worker.join(timeout=10)

    def _state(self, state: str, reason: str) -> None:
        self._last_state = state
        self.send(VoiceState(state, reason))

    def _run_turns(self) -> None:
        from engine.session import Turn

        while (item := self._turns.get()) is not None:
            audio, gate, cancel = item
            with self._lock:
                if gate is not None and gate.poll() is False:
                    continue  # a draft dropped before it started
                self._cancel = cancel
                self.turn_marks = {"start": self.clock()}
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    wav = write_wav(Path(tmp) / "voice.wav", audio, WHISPER_RATE)
                    turn = Turn(attachments=(str(wav),), names=("voice message.wav",), spoken=True, speak=True)
                    for event in self.session.submit(turn, cancel, gate):
                        self._route(event, gate)
            except Exception as exc:  # a failed turn is reported; voice mode keeps listening
                self._route(Error(f"The voice turn failed: {exc}", recoverable=True), gate)
            finally:
                with self._lock:
                    if gate is None or gate.ok:
                        self._open_turns -= 1
                    self._cancel = None
            self.pump()
