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

Two things make it quicker than the VAD's 32 ms frames allow. While the
assistant speaks, an energy onset detector looks at every 16 ms hop of the
echo-free residual: a sudden rise well over the noise floor that the echo does
not explain pauses the audio at once (SpeechOnset); Silero then confirms
(BargeIn) or the audio resumes (OnsetRejected). And the end-of-turn hangover
adapts: the caller reports what the speculative answer heard
(`transcript_hint`); a transcript that ends a sentence ends the turn after
`SHORT_HANGOVER_S` of silence, one that stops mid-phrase ("tell me about
the") waits the configured `end_silence_ms`.
"""
from __future__ import annotations

import re
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
ECHO_WINDOW_S = 0.7  # played audio whose reflections may still be in the mic
# the reflections' bound applies unless, over the last 32+ audible hops and frames, less than this share
# was a clear echo (bench/echo.py: 0.25-1.0 with echo; 0-0.2 with none, the user's voice matching by chance)
ECHO_HEARD = 0.22
ECHO_MARGIN = 0.5  # what the echo fit leaves must be louder than this times the loudest possible echo
HOP = 256  # the energy onset detector's step (16 ms)
ONSET_DB = 15.0  # a hop this far over the noise floor, unexplained by the echo, pauses the answer at once
ONSET_MIN_DB = -45.0  # ... and at least this loud (dBFS)
ONSET_HOPS = 2  # consecutive loud hops needed
FLOOR_RISE_DB = 0.02  # per hop: how fast the noise floor estimate follows a louder background (~1.2 dB/s)
END_BELOW_PEAK_DB = 40.0  # a hop this far under the utterance's peak (and 6 dB over the floor at most)
END_ABOVE_FLOOR_DB = 6.0  # is quiet: that long quiet is a likely end, before the VAD (which lags ~70 ms) says so
VAD_LAG_FRAMES = 3  # Silero reports speech this many frames after the sound stops, at most
SHORT_HANGOVER_S = 0.25  # silence that ends a turn whose transcript is a complete sentence
_INCOMPLETE = re.compile(r"(\b(a|an|the|and|or|but|of|to|in|on|at|for|with|about|from|my|your|is|are|was|"
                         r"if|so|because|that|which|um|uh|like)|,|-|\.\.\.)\s*$", re.I)


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
    def __init__(self, vad: Callable[[np.ndarray], float], cfg: VADConfig, sample_rate: int = 16000,
                 energy_onset: bool = True) -> None:
        self.vad, self.cfg, self.rate = vad, cfg, sample_rate
        self.energy_onset = energy_onset  # the 16 ms energy detector that pauses the answer before Silero
        self.frame_s = FRAME / sample_rate
        self.state = State.IDLE
        self.transitions: list[tuple[float, State, State, str]] = []
        self._pending = np.zeros(0, np.float32)
        self._samples = 0  # mic samples consumed: the stream clock
        self._recent: deque[bool] = deque()  # speech/non-speech of recent frames, for onset detection
        self._silence_s = 0.0
        self._paused = False
        self._paused_at = 0.0
        self._utterance: list[np.ndarray] | None = None
        self._speculated = False  # EndLikely sent for the current pause
        self._preroll: deque[np.ndarray] = deque(maxlen=int(1.0 / self.frame_s))
        self._ref = np.zeros(0, np.float32)
        self._ref_until = -1.0  # stream time until which echo may be present
        self._echo_gain = 0.0  # the echo path's gain, learnt from clear echoes
        self._echo_gains: deque[float] = deque(maxlen=32)
        self._echo_seen: deque[bool] = deque(maxlen=96)  # recent audible mic hops/frames: a clear echo or not
        self._hop_pos = 0  # where in _pending the energy detector has got to
        self._floor_db = -60.0  # noise floor of the (echo-free) mic signal
        self._loud_hops = 0
        self._peak_db, self._quiet_s = -120.0, 0.0  # the utterance's loudest hop; how long since it was loud
        self._heard_since = 0  # VAD speech frames in a row since the likely end
        self._hangover_s = cfg.end_silence_ms / 1000
        self.energy_onsets = 0  # pauses the energy detector made (the echo bench counts them)

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

    def transcript_hint(self, text: str) -> None:
        """What the answer prepared at the current pause heard: a complete sentence
        ends the turn after a short hangover, an unfinished phrase after the full one."""
        if self._utterance is not None and self._speculated:
            self._hangover_s = hangover_for(text, self.cfg.end_silence_ms / 1000)

    def playback_done(self) -> None:
        """The answer finished (or there was nothing to say): listen again."""
        if self.state in (State.SPEAKING, State.THINKING):
            self._go(State.LISTENING, "answer done")
        self._paused = False

    # microphone
    def feed(self, mic: np.ndarray, now: float | None = None) -> list:
        self._pending = np.concatenate([self._pending, np.asarray(mic, np.float32)])
        actions: list = []
        while True:
            # every 16 ms hop goes through the energy onset detector as soon as it is here
            upto = min(len(self._pending), FRAME)
            while self._hop_pos + HOP <= upto:
                self._track_level(self._pending[self._hop_pos:self._hop_pos + HOP])
                onset = self._energy_onset(self._pending[self._hop_pos:self._hop_pos + HOP], self._hop_pos)
                self._hop_pos += HOP
                if onset is not None:
                    actions.append(onset)
            if len(self._pending) < FRAME:
                return actions
            frame, self._pending = self._pending[:FRAME], self._pending[FRAME:]
            self._samples += FRAME
            self._hop_pos -= FRAME
            actions.extend(self._step(frame))

    def _track_level(self, hop: np.ndarray) -> None:
        """The noise floor, and how long the mic has been quiet (far below the utterance's peak)."""
        level = _db(hop)
        if level <= self._floor_db + ONSET_DB:
            self._floor_db = min(level, self._floor_db + FLOOR_RISE_DB)
        if self._utterance is None:
            self._peak_db, self._quiet_s = -120.0, 0.0
            return
        self._peak_db = max(self._peak_db, level)
        quiet = self._peak_db > self._floor_db + ONSET_DB and \
            level < max(self._floor_db + END_ABOVE_FLOOR_DB, self._peak_db - END_BELOW_PEAK_DB)
        self._quiet_s = self._quiet_s + HOP / self.rate if quiet else 0.0

    def _energy_onset(self, hop: np.ndarray, offset: int):
        """SpeechOnset when this 16 ms hop rises far over the noise floor, unexplained by the echo."""
        if not self.energy_onset:
            return None
        heard, explained, echo = self._echo_check(hop)
        if echo or explained >= 0.5:
            self._loud_hops = 0
            return None
        loud = _db(heard) > max(self._floor_db + ONSET_DB, ONSET_MIN_DB)
        self._loud_hops = self._loud_hops + 1 if loud else 0
        if (self.state is State.SPEAKING and not self._paused and self._utterance is None
                and self._loud_hops >= ONSET_HOPS):
            self._paused, self._paused_at = True, self.now
            self.energy_onsets += 1
            return SpeechOnset(self.now + (offset + HOP) / self.rate)
        return None

    def _echo_check(self, x: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """(what is left of `x`, a frame or hop, with the echo taken out; how much of it the
        echo explains; whether it is the assistant's own voice)."""
        if not (self.cfg.echo_guard and self.now <= self._ref_until and len(self._ref) >= FRAME):
            return x, 0.0, False
        residual, explained, gain = _remove_echo(x, self._ref)
        if float(np.dot(x, x)) / len(x) > 1e-5:  # audible: is the echo what the mic hears?
            self._echo_seen.append(explained >= ECHO_EXPLAINED)
        if explained >= ECHO_EXPLAINED:
            if float(np.dot(x, x)) / len(x) > 1e-7:  # a clear echo: how loud the echo path is
                self._echo_gains.append(min(abs(gain), 4.0))  # (the median: a chance match of the user's
                self._echo_gain = float(np.median(self._echo_gains))  # voice with the reference says little)
            return residual, explained, True
        if len(self._echo_seen) >= 32 and sum(self._echo_seen) < ECHO_HEARD * len(self._echo_seen):
            return residual, explained, False  # little or no echo comes back (headphones, the browser's AEC)
        # what the echo fit leaves (the room's reflections) is no louder than the loudest recent
        # played audio through the echo path: the user is what rises above that
        recent = self._ref[-int(ECHO_WINDOW_S * self.rate):]
        recent = recent[: len(recent) // HOP * HOP].reshape(-1, HOP)
        loudest = float(np.max(np.mean(recent * recent, axis=1))) if len(recent) else 0.0
        left = float(np.dot(residual, residual)) / len(x)
        return residual, explained, left <= ECHO_MARGIN * self._echo_gain ** 2 * loudest

    def _is_speech(self, frame: np.ndarray) -> bool:
        heard, _, echo = self._echo_check(frame)
        if echo:
            self.vad(heard)  # keep the VAD's state moving
            return False
        threshold = self.cfg.threshold if heard is frame else max(self.cfg.threshold, ECHO_THRESHOLD)
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
                    self._paused, self._paused_at = True, self.now
                    return [SpeechOnset(self.now)]
                if self._paused and self.now - self._paused_at >= RESUME_S - 1e-9 and len(self._recent) >= quiet \
                        and not any(list(self._recent)[-quiet:]):
                    self._paused = False
                    return [OnsetRejected(self.now)]
            if self.state is State.IDLE or heard_s < needed:
                return []
            onset = len(self._recent) + 3  # ~100 ms before the onset
            if busy and self._paused:  # over the answer: from where its audio paused, if that was earlier
                onset = max(onset, int((self.now - self._paused_at) / self.frame_s) + 4)
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
        if self._silence_s < self._hangover_s - 1e-9:
            # (the VAD lags the sound by ~2 frames: speech it reports while the mic stays quiet is no resumption,
            # unless it goes on longer than that lag)
            self._heard_since = self._heard_since + 1 if speech and self._speculated else 0
            if speech and self._speculated and (self._quiet_s < self.frame_s or self._heard_since > VAD_LAG_FRAMES):
                self._speculated = False
                self._hangover_s = self.cfg.end_silence_ms / 1000
                return [SpeechResumed(self.now)]
            quiet_ms = self._quiet_s * 1000 if self.energy_onset else 0.0
            if 0 < self.cfg.speculate_ms <= max(silence_ms, quiet_ms) and not self._speculated:
                self._speculated = True
                return [EndLikely(np.concatenate(self._utterance), self.now)]
            return []
        audio = np.concatenate(self._utterance)
        self._utterance, self._speculated = None, False
        self._hangover_s = self.cfg.end_silence_ms / 1000
        self._recent.clear()
        self._preroll.clear()
        return [UtteranceEnded(audio, self.now)]


def hangover_for(text: str, full_s: float) -> float:
    """End-of-turn silence for a transcript: short after a finished sentence, else the full one."""
    text = text.strip()
    if text and text[-1] in ".?!" and not _INCOMPLETE.search(text.rstrip(".?! ")):
        return min(full_s, SHORT_HANGOVER_S)
    return full_s


def _db(x: np.ndarray) -> float:
    return float(10 * np.log10(float(np.dot(x, x)) / len(x) + 1e-12))


def _remove_echo(frame: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Subtract the best-matching (lag, gain) slice of the played audio; return
    (residual, fraction of the frame's energy the echo explains, the gain)."""
    energy = float(np.dot(frame, frame))
    if energy < 1e-8:
        return frame, 1.0, 0.0
    m = len(frame)
    size = 1 << (len(ref) + m - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(ref, size) * np.conj(np.fft.rfft(frame, size)), size)[: len(ref) - m + 1]
    sq = np.concatenate([[0.0], np.cumsum(ref.astype(np.float64) ** 2)])
    win = sq[m:] - sq[:-m]
    explained = np.where(win > 1e-8, corr ** 2 / np.maximum(win, 1e-8), 0.0)
    k = int(np.argmax(explained))
    if win[k] <= 1e-8:
        return frame, 0.0, 0.0
    gain = corr[k] / win[k]
    residual = (frame - gain * ref[k:k + m]).astype(np.float32)
    return residual, float(min(1.0, explained[k] / energy)), float(gain)
