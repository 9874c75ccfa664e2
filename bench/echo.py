#!/usr/bin/env python3
"""Echo guard and barge-in onset bench: engine/speech/duplex.Duplex on real Silero and
Piper audio, on the stream clock (so the figures do not depend on the CPU's load).

 (a) echo only: the answer, played, comes back into the microphone through a room
     (direct path delayed by the output latency, a reverberant tail, background
     noise) at realistic levels; every SpeechOnset (the answer pauses) and BargeIn
     (the answer is cancelled) is false. Goal: 0 false barge-ins.
 (b) the user talks over that echo: true speech onset (first audible sample of the
     user's words) -> SpeechOnset (the answer's audio stopped), p50/p90, with the
     energy onset detector and without it (Silero alone), and how many barge-ins
     were caught.
 (c) endpointing: the last audible sample of a question -> the answer started
     speculatively, energy detector vs Silero alone, and mid-sentence guesses dropped.
Prints one JSON object and writes bench/results/echo.json.

    python bench/echo.py
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RATE = 16_000
ANSWERS = [
    "Paris is the capital of France. It is famous for the Eiffel Tower and its museums.",
    "Plants make food by photosynthesis, using sunlight, water and carbon dioxide.",
    "The largest ocean is the Pacific. It covers about a third of the planet.",
    "Sure! Boil some water, pour it over a tea bag, wait three minutes, and add milk if you like.",
]
USERS = ["Stop, tell me about Berlin instead.", "Wait, what about the moon?", "No, that's not what I asked.",
         "Hang on a second.", "Actually, never mind."]
ECHOES = [  # (gain of the direct path, output latency s, reflections' level dB re the direct path)
    # what is left after the browser's own echo canceller (getUserMedia echoCancellation: true)
    (0.03, 0.04, -3), (0.06, 0.08, -3), (0.1, 0.12, -3),
    # no echo canceller: laptop speakers at a moderate to loud volume
    (0.2, 0.03, -12), (0.4, 0.06, -10), (0.7, 0.08, -8), (1.0, 0.12, -8)]
USER_GAIN = 0.7  # the user's voice at the mic (the Piper voice peaks near full scale)


def room(delay_s: float, gain: float, tail_db: float, rng) -> np.ndarray:
    """A room's impulse response: the direct path, then ~250 ms of decaying reflections."""
    n = int((delay_s + 0.25) * RATE)
    h = np.zeros(n, np.float32)
    d = int(delay_s * RATE)
    h[d] = gain
    t = np.arange(n - d - 1) / RATE
    tail = rng.normal(0, 1, len(t)) * np.exp(-6.9 * t / 0.25)  # T60 250 ms
    tail *= gain * 10 ** (tail_db / 20) / np.sqrt(np.sum(tail ** 2) + 1e-12)
    h[d + 1:] += tail.astype(np.float32)
    return h


def run(d, answer: np.ndarray, h: np.ndarray, near: np.ndarray, step: int = 320) -> list:
    """Play `answer` through the room `h` into the mic, with `near` (the user, noise) added, in
    20 ms steps as voice.VoiceSession does: a pause stops the playback, so its echo too; the
    answer resumes where it stopped. The duplex's actions."""
    from engine.speech.duplex import BargeIn, OnsetRejected, SpeechOnset

    played = np.zeros(len(near) + len(h), np.float32)
    acts, paused, pos = [], False, 0
    for i in range(0, len(near), step):
        if not paused and pos < len(answer):
            chunk = answer[pos:pos + step]
            pos += len(chunk)
            played[i:i + len(chunk)] = chunk
            d.playing(chunk)
        lo = max(0, i - len(h) + 1)
        echo = np.convolve(played[lo:i + step], h)[i - lo:i - lo + step]
        for a in d.feed((near[i:i + step] + echo[: len(near[i:i + step])]).astype(np.float32)):
            acts.append(a)
            paused = True if isinstance(a, (SpeechOnset, BargeIn)) else (False if isinstance(a, OnsetRejected) else paused)
    return acts


def likely_end(say, vad) -> dict:
    """(c) endpointing on the bench's questions (bench/voice.py) in a quiet room: the last
    audible sample -> the answer started speculatively (EndLikely that stood), and how
    many guesses were dropped mid-sentence, for the energy detector and Silero alone."""
    from engine.config import VADConfig
    from engine.speech.duplex import Duplex, EndLikely, SpeechResumed, UtteranceEnded
    from voice import QUESTIONS

    rng = np.random.default_rng(3)
    out = {}
    for speculate in (64, 200):
        for energy in (True, False):
            lags, ends, dropped = [], [], 0
            for q in QUESTIONS:
                speech = say(q)
                last = np.flatnonzero(np.abs(speech) > 0.01)[-1] / RATE
                audio = np.concatenate([speech, np.zeros(RATE, np.float32)])
                audio += rng.normal(0, 10 ** (-70 / 20), len(audio)).astype(np.float32)
                vad.reset()
                d = Duplex(vad, VADConfig(speculate_ms=speculate), energy_onset=energy)
                d.start_listening()
                acts = [a for i in range(0, len(audio), 320) for a in d.feed(audio[i:i + 320])]
                likely = [a for a in acts if isinstance(a, EndLikely)]
                dropped += sum(isinstance(a, SpeechResumed) for a in acts)
                if likely:
                    lags.append((likely[-1].t - last) * 1000)
                ends += [(a.t - last) * 1000 for a in acts if isinstance(a, UtteranceEnded)]
            out[f"speculate_{speculate}_{'energy' if energy else 'silero'}"] = {
                "likely_end_after_last_sound_ms_p50": round(statistics.median(lags), 1),
                "likely_end_after_last_sound_ms_p90": round(float(np.percentile(lags, 90)), 1),
                "utterance_end_after_last_sound_ms_p50": round(statistics.median(ends), 1),
                "guesses_dropped": dropped, "questions": len(QUESTIONS)}
    return out


def main() -> None:
    from engine.config import VADConfig
    from engine.speech.audio import prepare
    from engine.speech.duplex import BargeIn, Duplex, SpeechOnset
    from engine.speech.tts import PiperTTS
    from engine.speech.vad import SileroVAD

    tts, vad, cfg = PiperTTS("joe-us", variation=0.0), SileroVAD(), VADConfig()

    def say(text: str) -> np.ndarray:
        return prepare(np.concatenate(list(tts.synthesize(text))), tts.sample_rate, RATE)

    answers = [say(a) for a in ANSWERS]
    # the user: another voice (the same one, 15% higher), as a person's voice differs from the assistant's
    users = [prepare(np.concatenate(list(tts.synthesize(u))), int(tts.sample_rate * 1.15), RATE) for u in USERS]
    result: dict = {"echo_conditions": [list(e) for e in ECHOES]}
    for energy in (True, False):
        rng = np.random.default_rng(7)
        pauses, barges = [], []
        for gain, delay, tail in ECHOES:
            pauses.append(0)
            barges.append(0)
            for answer in answers:
                h = room(delay, gain, tail, rng)
                near = rng.normal(0, 10 ** (-60 / 20), len(answer) + RATE).astype(np.float32)
                vad.reset()
                d = Duplex(vad, cfg, energy_onset=energy)
                d.start_listening()
                d.thinking()
                acts = run(d, answer, h, near)
                pauses[-1] += sum(isinstance(a, SpeechOnset) for a in acts)
                barges[-1] += sum(isinstance(a, BargeIn) for a in acts)
        key = "energy_onset" if energy else "silero_only"
        result[key] = {"echo_runs": len(ECHOES) * len(answers), "echo_false_barge_ins": sum(barges),
                       "echo_false_pauses": sum(pauses), "false_pauses_by_condition": pauses,
                       "false_barge_ins_by_condition": barges}
    for energy in (True, False):
        stops, caught, n = [], 0, 0
        by_condition = {str(e): [0, 0] for e in ECHOES[:5]}  # [stopped, barged in]
        for k, user in enumerate(users):
            for gain, delay, tail in ECHOES[:5]:
                answer = answers[k % len(answers)]
                at = int(1.2 * RATE)
                h = room(delay, gain, tail, rng)
                near = np.zeros(max(len(answer), at + len(user) + RATE), np.float32)
                near[at:at + len(user)] += user * USER_GAIN
                near += rng.normal(0, 10 ** (-60 / 20), len(near)).astype(np.float32)
                onset = (at + int(np.argmax(np.abs(user) > 0.02))) / RATE  # first audible sample
                vad.reset()
                d = Duplex(vad, cfg, energy_onset=energy)
                d.start_listening()
                d.thinking()
                acts = run(d, answer, h, near)
                n += 1
                pause = next((a.t for a in acts if isinstance(a, SpeechOnset) and a.t >= onset - 0.05), None)
                if pause is not None:
                    stops.append((pause - onset) * 1000)
                barged = any(isinstance(a, BargeIn) and a.t >= onset for a in acts)
                caught += barged
                by_condition[str((gain, delay, tail))][0] += pause is not None
                by_condition[str((gain, delay, tail))][1] += barged
        key = "energy_onset" if energy else "silero_only"
        result[key] |= {"stop_ms_p50": round(statistics.median(stops), 1) if stops else None,
                       "stop_ms_p90": round(float(np.percentile(stops, 90)), 1) if stops else None,
                       "stopped": len(stops), "barge_ins": caught, "trials": n,
                        "stopped_and_barged_by_condition": by_condition}
    result["likely_end"] = likely_end(say, vad)
    out = ROOT / "bench" / "results" / "echo.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
