#!/usr/bin/env python3
"""Voice latency on the cpu profile, driven at real-time pace like a person.

Synthesized questions (Piper) are fed as microphone audio in 20 ms frames at
real-time pace into engine.voice_session.VoiceSession, the same object the
browser's WebSocket drives. Each answer is interrupted by the next question,
so one run measures both:
 (a) end of user speech -> first answer audio sample released, p50/p90, with
     the breakdown (VAD hangover, ASR, LLM to first speakable piece, TTS);
 (b) user speech onset during an answer -> answer audio stopped, p50/p90;
 (c) ASR real-time factor and WER on those questions;
 (d) TTS real-time factor and first-chunk time.
The utterance loop runs twice in one run: with the answer prepared speculatively
at a 200 ms pause (ours) and without (the plain way: wait for the end of the
utterance), reported side by side as a ratio. `--with-chat` adds a third pass
with a chat streaming long answers alongside the whole time (another tab: the
model's continuous batching serves both), reported against the idle figure.
Prints one JSON object as its last line and writes bench/results/voice.json.

    python bench/voice.py [--utterances 21]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "What is the capital of France?", "Tell me a fun fact about the moon.", "How do plants make food?",
    "What is two plus two?", "Name a famous painter.", "Why is the sky blue?", "What should I cook tonight?",
    "How far away is the sun?", "Give me a word that rhymes with cat.", "What is the largest ocean?",
    "How many legs does a spider have?", "Tell me about the Eiffel Tower.", "What is your favourite colour?",
    "How do I make a cup of tea?", "What is the speed of light?", "Who wrote Romeo and Juliet?",
    "What language is spoken in Brazil?", "Recommend a good book.", "How tall is Mount Everest?",
    "What is a black hole?", "Say something nice.", "What day comes after Monday?",
]
FRAME_S = 0.02
RATE = 16_000


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(float(values[min(len(values) - 1, int(round(q * (len(values) - 1))))]), 1)


class Recorder:
    """Collects the session's events with the time they were sent."""

    def __init__(self) -> None:
        self.events: list[tuple[float, object]] = []
        self.lock = threading.Lock()

    def __call__(self, event) -> None:
        with self.lock:
            self.events.append((time.monotonic(), event))

    def first(self, kind: str, after: float):
        with self.lock:
            for t, ev in self.events:
                if t >= after and ev.type == kind:
                    return t, ev
        return None


def feed_realtime(session, audio: np.ndarray, clock_start: float, fed: list[float]) -> float:
    """Feed `audio` in 20 ms frames at real-time pace; return when its last sample went in."""
    step = int(RATE * FRAME_S)
    for i in range(0, len(audio), step):
        target = clock_start + fed[0]
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        session.feed(audio[i:i + step].astype(np.float32), RATE)
        fed[0] += step / RATE
    return time.monotonic()


def wait_for_quiet(limit_s: float = 300.0, below: float = 1.5) -> list[float]:
    """The CPU is shared: wait (at most limit_s) for the 1-minute load to drop below `below`."""
    deadline = time.monotonic() + limit_s
    while True:
        load = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
        if load[0] <= below or time.monotonic() > deadline:
            return load
        time.sleep(10)


def chat_alongside(engine, run_pass) -> tuple[list[float], int]:
    """run_pass() while another conversation streams long answers, one after another; (the voice
    turns' end of speech -> first audio, tokens the chat streamed meanwhile)."""
    from engine.events import CancelToken, TextDelta

    stop, tokens = threading.Event(), [0]

    def chat() -> None:
        while not stop.is_set():
            cancel = CancelToken()
            msgs = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
            for event in engine.answer(msgs, engine.params(max_new_tokens=300, temperature=0.7), cancel):
                if isinstance(event, TextDelta):
                    tokens[0] += 1
                if stop.is_set():
                    cancel.cancel("done")

    thread = threading.Thread(target=chat, daemon=True)
    thread.start()
    time.sleep(2)
    eos = run_pass()[0]
    stop.set()
    thread.join(60)
    return eos, tokens[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--utterances", type=int, default=21)
    ap.add_argument("--speculate-ms", type=int, default=None, help="override vad.speculate_ms (0: off)")
    ap.add_argument("--with-chat", action="store_true", help="also measure with a chat streaming alongside")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "voice.json"))
    args = ap.parse_args()
    load_before = wait_for_quiet()

    from engine.config import load_config
    from engine.engine import Engine
    from engine.speech.asr import word_error_rate
    from engine.speech.audio import prepare
    from engine.voice_session import VoiceSession

    cfg = load_config("cpu", overrides={"data_dir": tempfile.mkdtemp(prefix="omni-voice-"),
                                        "max_new_tokens": "60", "temperature": "0",
                                        **({"vad.speculate_ms": str(args.speculate_ms)}
                                           if args.speculate_ms is not None else {})}, env={})
    engine = Engine(cfg)
    engine.start_loading().join()
    tts, asr, llm = engine.roles["tts"].get(), engine.roles["asr"].get(), engine.roles["llm"].get()
    llm_label = f"{llm.name} ({llm.decode_path})"  # (before engine.close() drops the model)
    serving = f"{llm.parallel} slots" if llm.schedules else "one at a time"

    # (d) TTS on its own
    tts_rtf, tts_first = [], []
    for text in QUESTIONS[:8]:
        start = time.perf_counter()
        first, samples = None, 0
        for chunk in tts.synthesize(text):
            first = first or time.perf_counter()
            samples += len(chunk)
        tts_rtf.append((time.perf_counter() - start) / (samples / tts.sample_rate))
        tts_first.append((first - start) * 1000)

    speech = [prepare(np.concatenate(list(tts.synthesize(q))), tts.sample_rate, RATE)
              for q in QUESTIONS[: args.utterances]]
    # (c) ASR on its own
    asr_rtf, wers = [], []
    for q, audio in zip(QUESTIONS, speech):
        start = time.perf_counter()
        text = asr.transcribe(audio).text
        asr_rtf.append((time.perf_counter() - start) / (len(audio) / RATE))
        wers.append(word_error_rate(q, text))

    def run_pass() -> tuple:
        """One conversation of all the questions, each barging in on the previous answer."""
        rec = Recorder()
        session = VoiceSession(engine, rec)
        silence = np.zeros(int(RATE * FRAME_S), np.float32)
        t0, fed = time.monotonic(), [0.0]
        eos_to_audio, bargein, bargein_speech, cancels, breakdown, transcripts = [], [], [], [], [], []
        tails: list[float] = []
        last_first_audio = 0.0

        def idle_until(pred, limit: float) -> None:
            deadline = time.monotonic() + limit
            while not pred() and time.monotonic() < deadline:
                feed_realtime(session, silence, t0, fed)

        for i, audio in enumerate(speech):
            onset = time.monotonic()
            speaking_before = i > 0 and last_first_audio > 0
            eos = feed_realtime(session, audio, t0, fed)
            if speaking_before:
                hit = rec.first("voice_state", onset)
                while hit and hit[1].state != "interrupted":
                    hit = rec.first("voice_state", hit[0] + 1e-6)
                if hit and session.marks.get("audio_stopped", 0) >= onset:
                    bargein.append((session.marks["audio_stopped"] - onset) * 1000)
                    # from the first audible sample (Piper leads with ~50 ms of near-silence)
                    lead = int(np.argmax(np.abs(audio) > 0.02)) / RATE
                    bargein_speech.append((session.marks["audio_stopped"] - onset - lead) * 1000)
                    cancels.append((session.marks["cancelled"] - onset) * 1000)
            idle_until(lambda: rec.first("audio_chunk", eos) is not None, 30)
            said = rec.first("transcript", onset)
            transcripts.append(said[1].text if said else "")
            got = rec.first("audio_chunk", eos)
            if got is None:
                continue
            last_first_audio = got[0]
            eos_to_audio.append((got[0] - eos) * 1000)
            tail = (len(audio) - 1 - np.flatnonzero(np.abs(audio) > 0.01)[-1]) / RATE  # Piper's trailing silence
            tails.append(tail * 1000)
            ended = session.marks.get("utterance_end", eos)
            m = dict(session.turn_marks)  # when the (speculative) turn made each thing, before it was released
            start, heard, text, audio_made = (m.get(k) for k in ("start", "transcript", "text_delta", "audio_chunk"))
            breakdown.append({
                "vad_hangover_ms": (ended - eos) * 1000,
                "turn_start_ms": (start - eos) * 1000 if start else None,  # speculative: before the hangover ends
                "asr_ms": (heard - start) * 1000 if heard and start else None,
                "llm_first_text_ms": (text - heard) * 1000 if text and heard else None,
                "text_to_audio_ms": (audio_made - text) * 1000 if audio_made and text else None,
                "held_until_out_ms": (got[0] - audio_made) * 1000 if audio_made else None,
            })
            idle_until(lambda: False, 0.6)  # let the answer play a little, then the next question barges in
        session.close()
        live_wer = sum(word_error_rate(q, h) for q, h in zip(QUESTIONS, transcripts)) / max(1, len(transcripts))
        return (eos_to_audio, (bargein, bargein_speech), cancels, breakdown, live_wer, session.duplex.energy_onsets,
                tails, transcripts)

    # the plain alternative first: wait for the end of the utterance, then start the turn
    base_cfg = engine.config
    engine.config = replace(base_cfg, vad=replace(base_cfg.vad, speculate_ms=0))
    plain_eos, _, _, _, plain_wer, _, _, _ = run_pass()
    engine.config = base_cfg
    eos_to_audio, (bargein, bargein_speech), cancels, breakdown, live_wer, energy_onsets, tails, heard = run_pass()
    busy = chat_alongside(engine, run_pass) if args.with_chat else None
    load_after = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    engine.close()

    def med(key):
        vals = [b[key] for b in breakdown if b[key] is not None]
        return round(statistics.median(vals), 1) if vals else None

    result = {
        "utterances": len(speech),
        "eos_to_first_audio_ms_p50": pct(eos_to_audio, 0.5), "eos_to_first_audio_ms_p90": pct(eos_to_audio, 0.9),
        "no_speculation_eos_to_first_audio_ms_p50": pct(plain_eos, 0.5),
        "no_speculation_eos_to_first_audio_ms_p90": pct(plain_eos, 0.9),
        "speedup_vs_no_speculation_p50": round(pct(plain_eos, 0.5) / pct(eos_to_audio, 0.5), 3),
        # "end of speech" above is the end of the question's audio; its last audible sample came earlier by:
        "question_trailing_silence_ms_p50": pct(tails, 0.5),
        "breakdown_ms_p50": {k: med(k) for k in ("vad_hangover_ms", "turn_start_ms", "asr_ms", "llm_first_text_ms",
                                                  "text_to_audio_ms", "held_until_out_ms")},
        "bargein_stop_ms_p50": pct(bargein, 0.5), "bargein_stop_ms_p90": pct(bargein, 0.9),
        "bargein_from_first_audible_ms_p50": pct(bargein_speech, 0.5),
        "bargein_from_first_audible_ms_p90": pct(bargein_speech, 0.9),
        "bargein_samples": len(bargein), "bargein_energy_onsets": energy_onsets,
        "bargein_cancel_ms_p50": pct(cancels, 0.5), "bargein_cancel_ms_p90": pct(cancels, 0.9),
        "asr_wer": round(sum(wers) / len(wers), 4), "live_transcript_wer": round(live_wer, 4),
        "no_speculation_live_transcript_wer": round(plain_wer, 4), "asr_rtf": round(statistics.median(asr_rtf), 3),
        "tts_rtf": round(statistics.median(tts_rtf), 3), "tts_first_chunk_ms": round(statistics.median(tts_first), 1),
        "vad_end_silence_ms": cfg.vad.end_silence_ms, "vad_speculate_ms": cfg.vad.speculate_ms, "min_barge_in_ms": cfg.vad.min_barge_in_ms,
        "llm": llm_label, "asr": asr.name, "tts": tts.name,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "live_transcripts": heard,
    }
    if busy is not None:
        eos_busy, tokens = busy
        result["with_chat_eos_to_first_audio_ms_p50"] = pct(eos_busy, 0.5)
        result["with_chat_eos_to_first_audio_ms_p90"] = pct(eos_busy, 0.9)
        result["with_chat_vs_idle_p50"] = round(pct(eos_busy, 0.5) / pct(eos_to_audio, 0.5), 3)
        result["chat_tokens_streamed_alongside"] = tokens
        result["llm_serving"] = serving
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
