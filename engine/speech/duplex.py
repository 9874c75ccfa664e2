"""Turn-taking for a spoken conversation: an explicit state machine.

Driven by microphone frames (`feed`) and by what the caller does with the
engine (`thinking`, `playing`, `playback_done`); no threads, no I/O, so it
is tested with scripted probabilities as well as real speech.

    IDLE -> LISTENING -(utterance ends)-> THINKING -(answer audio)-> SPEAKING
    SPEAKING -(answer played)-> LISTENING
    THINKING/SPEAKING -(sustained user speech)-> INTERRUPTED -> LISTENING

An utterance starts after `min_speech_ms` of speech and ends after
`end_silence_ms` of silence. After `speculate_ms` of silence the end is
likely (EndLikely, with the audio so far): the caller may start preparing the
answer then, and drops it if the user goes on (SpeechResumed). While the assistant thinks or speaks, only
`min_barge_in_ms` of sustained speech interrupts, so coughs and "mm-hm"
don't; but ~100 ms of speech already pauses the answer's audio
(SpeechOnset), resumed if it was nothing (OnsetRejected), so the assistant
falls silent at once when the user starts talking. The echo guard keeps the assistant's own voice, coming back through
the speakers into the microphone, from counting as the user: each mic frame
is matched against the audio just played (best lag and gain by
cross-correlation), the echo is subtracted and the VAD hears the residual,
with a raised threshold.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import numpy as np

from engine.config import VADConfig

FRAME = 512
PAUSE_S = 0.064  # speech that pauses the answer's audio (2 frames)
RESUME_S = 0.3  # silence after a pause that resumes the audio
ONSET_SLACK_S = 0.3  # pauses tolerated inside the speech that starts an utterance
ECHO_REF_S = 1.5  # how much played audio the guard searches for echo
ECHO_TAIL_S = 0.8  # the guard stays on this long after playback ends
ECHO_THRESHOLD = 0.8  # speech probability needed while the assistant's voice may be in the mic
ECHO_EXPLAINED = 0.7  # a frame whose energy is this much explained by the echo is not the user


class State(Enum):
    IDLE = "idle"
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class SpeechStarted:
    t: float


@dataclass(frozen=True)
class UtteranceEnded:
    audio: np.ndarray = field(repr=False)
    t: float


@dataclass(frozen=True)
class EndLikely:
    """A pause that will probably end the utterance: prepare the answer now, speculatively."""

    audio: np.ndarray = field(repr=False)
    t: float


@dataclass(frozen=True)
class SpeechResumed:
    """The user went on after EndLikely: the speculative answer is void."""

    t: float


@dataclass(frozen=True)
class BargeIn:
    t: float


@dataclass(frozen=True)
class SpeechOnset:
    """Possible user speech while the assistant talks: pause the audio now (fast),
    before it is known whether this is a real interruption."""

    t: float


@dataclass(frozen=True)
class OnsetRejected:
    """The onset was a noise or a back-channel: resume the paused audio."""

    t: float


class Duplex:
    def __init__(self, vad: Callable[[np.ndarray], float], cfg: VADConfig, sample_rate: int = 16000) -> None:
        self.vad, self.cfg, self.rate = vad, cfg, sample_rate
        self.frame_s = FRAME / sample_rate
        self.state = State.IDLE
        self.transitions: list[tuple[float, State, State, str]] = []
        self._pending = np.zeros(0, np.float32)
        self._samples = 0  # mic samples consumed: the stream clock
        self._recent: deque[bool] = deque()  # speech/non-speech of recent frames, for onset detection
        self._silence_s = 0.0
        self._paused = False
        self._utterance: list[np.ndarray] | None = None
        self._speculated = False  # EndLikely sent for the current pause
        self._preroll: deque[np.ndarray] = deque(maxlen=int(1.0 / self.frame_s))
        self._ref = np.zeros(0, np.float32)
        self._ref_until = -1.0  # stream time until which echo may be present

    @property
    def now(self) -> float:
        return self._samples / self.rate

    def _go(self, new: State, reason: str) -> None:
        if new is not self.state:
            self.transitions.append((round(self.now, 3), self.state, new, reason))
            self.state = new

    # caller events
    def start_listening(self) -> None:
        self._go(State.LISTENING, "voice mode on")

    def thinking(self) -> None:
        self._go(State.THINKING, "turn started")

    def playing(self, reference: np.ndarray) -> None:
        """The assistant's audio being played now (16 kHz): the echo reference."""
        keep = int(ECHO_REF_S * self.rate)
        self._ref = np.concatenate([self._ref, np.asarray(reference, np.float32)])[-keep:]
        self._ref_until = self.now + ECHO_TAIL_S + len(reference) / self.rate
        if self.state is State.THINKING:
            self._go(State.SPEAKING, "answer audio")

    def playback_done(self) -> None:
        """The answer finished (or there was nothing to say): listen again."""
        if self.state in (State.SPEAKING, State.THINKING):
            self._go(State.LISTENING, "answer done")
        self._paused = False

    # microphone
    def feed(self, mic: np.ndarray, now: float | None = None) -> list:
        self._pending = np.concatenate([self._pending, np.asarray(mic, np.float32)])
        actions: list = []
        while len(self._pending) >= FRAME:
            frame, self._pending = self._pending[:FRAME], self._pending[FRAME:]
            self._samples += FRAME
            actions.extend(self._step(frame))
        return actions

    def _is_speech(self, frame: np.ndarray) -> bool:
        threshold = self.cfg.threshold
        heard = frame
        if self.cfg.echo_guard and self.now <= self._ref_until and len(self._ref) >= FRAME:
            heard, explained = _remove_echo(frame, self._ref)
            if explained >= ECHO_EXPLAINED:
                self.vad(heard)  # keep the VAD's state moving
                return False
            threshold = max(threshold, ECHO_THRESHOLD)
        return self.vad(heard) >= threshold

    def _step(self, frame: np.ndarray) -> list:
        speech = self._is_speech(frame)
        busy = self.state in (State.THINKING, State.SPEAKING)
        if self._utterance is None:
            self._preroll.append(frame)
            needed = (self.cfg.min_barge_in_ms if busy else self.cfg.min_speech_ms) / 1000
            # speech onset: `needed` seconds of speech within a window 200 ms longer (short pauses allowed)
            self._recent.append(speech)
            while len(self._recent) * self.frame_s > needed + ONSET_SLACK_S:
                self._recent.popleft()
            heard_s = sum(self._recent) * self.frame_s
            if busy and self.state is State.SPEAKING:
                quiet = int(RESUME_S / self.frame_s)
                if not self._paused and speech and heard_s >= PAUSE_S:
                    self._paused = True
                    return [SpeechOnset(self.now)]
                if self._paused and len(self._recent) >= quiet and not any(list(self._recent)[-quiet:]):
                    self._paused = False
                    return [OnsetRejected(self.now)]
            if self.state is State.IDLE or heard_s < needed:
                return []
            onset = len(self._recent) + 3  # ~100 ms before the onset
            self._utterance = list(self._preroll)[-onset:]
            self._silence_s = 0.0
            if busy:
                self._paused = False
                self._go(State.INTERRUPTED, "user spoke over the answer")
                self._go(State.LISTENING, "hearing the new utterance")
                return [BargeIn(self.now)]
            return [SpeechStarted(self.now)]
        self._utterance.append(frame)
        self._silence_s = 0.0 if speech else self._silence_s + self.frame_s
        silence_ms = self._silence_s * 1000
        if silence_ms < self.cfg.end_silence_ms:
            if speech and self._speculated:
                self._speculated = False
                return [SpeechResumed(self.now)]
            if 0 < self.cfg.speculate_ms <= silence_ms and not self._speculated:
                self._speculated = True
                return [EndLikely(np.concatenate(self._utterance), self.now)]
            return []
        audio = np.concatenate(self._utterance)
        self._utterance, self._speculated = None, False
        self._recent.clear()
        self._preroll.clear()
        return [UtteranceEnded(audio, self.now)]


def _remove_echo(frame: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, float]:
    """Subtract the best-matching (lag, gain) slice of the played audio; return
    (residual, fraction of the frame's energy the echo explains)."""
    energy = float(np.dot(frame, frame))
    if energy < 1e-8:
        return frame, 1.0
    n = len(ref) + FRAME
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(ref, size) * np.conj(np.fft.rfft(frame, size)), size)[: len(ref) - FRAME + 1]
    sq = np.concatenate([[0.0], np.cumsum(ref.astype(np.float64) ** 2)])
    win = sq[FRAME:] - sq[:-FRAME]
    explained = np.where(win > 1e-8, corr ** 2 / np.maximum(win, 1e-8), 0.0)
    k = int(np.argmax(explained))
    if win[k] <= 1e-8:
        return frame, 0.0
    gain = corr[k] / win[k]
    residual = (frame - gain * ref[k:k + FRAME]).astype(np.float32)
    return residual, float(min(1.0, explained[k] / energy))
