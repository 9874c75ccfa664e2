#!/usr/bin/env python3
"""The OpenAI audio API and /v1/realtime on the cpu profile, measured through the official client.

 (a) transcription real-time factor through POST /v1/audio/transcriptions vs calling the
     same Whisper in-process (the API's overhead as a ratio), and the WER of both;
 (b) POST /v1/audio/speech: time to the first audio byte and the real-time factor (wav, mp3);
 (c) /v1/realtime: end of speech -> first response.audio.delta, p50/p90, with the audio
     sent at real-time pace in 20 ms frames like a microphone, beside the browser
     transport's figure from bench/results/voice.json;
 (d) chat completions with modalities ["text", "audio"]: the spoken answer transcribed
     back against its text (WER), with the real cpu-profile LLM.
Before timing, waits (up to 3 min) for the 1-minute load average to drop under 1.5 and
records it. Prints one JSON object as its last line and writes bench/results/api.json.

    python bench/api.py [--utterances 10]
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "What is the capital of France?", "Tell me a fun fact about the moon.", "How do plants make food?",
    "What is two plus two?", "Name a famous painter.", "Why is the sky blue?", "What should I cook tonight?",
    "How far away is the sun?", "What is the largest ocean?", "Who wrote Romeo and Juliet?",
    "What language is spoken in Brazil?", "Recommend a good book.",
]
PARAGRAPH = ("The museum opens at nine in the morning. Tickets are sold at the front desk, and children under "
             "twelve enter for free. The west wing holds paintings from the nineteenth century, while the east "
             "wing shows modern sculpture. Guided tours leave every hour from the main hall.")
FRAME_S = 0.02
PAUSE_S = 1.0  # silence between a cancelled answer and the next question
STAGES = ("input_audio_buffer.speech_stopped", "conversation.item.input_audio_transcription.completed",
          "response.created", "response.audio_transcript.delta", "response.audio.delta")
PARTS = ("transcription", "speech", "realtime", "chat_audio")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(float(values[min(len(values) - 1, int(round(q * (len(values) - 1))))]), 1)


def wait_for_quiet(limit_s: float = 180.0, threshold: float = 1.5) -> dict:
    """Wait (bounded) for the machine to be quiet; report the load before and at the start."""
    def load() -> float:
        return float(Path("/proc/loadavg").read_text().split()[0])

    first, start = load(), time.monotonic()
    while load() > threshold and time.monotonic() - start < limit_s:
        time.sleep(5)
    return {"load_1min_at_start": first, "load_1min_when_timing": load(),
            "waited_s": round(time.monotonic() - start, 1), "quiet": load() <= threshold}


def wav_bytes(x: np.ndarray, rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def bench_transcription(client, asr, clips: list[tuple[str, np.ndarray]]) -> dict:
    from engine.speech.asr import word_error_rate

    api_s, local_s, total, wers_api, wers_local = 0.0, 0.0, 0.0, [], []
    for text, audio in clips:
        data = wav_bytes(audio, 16000)
        t = time.perf_counter()
        local = asr.transcribe(audio).text
        local_s += time.perf_counter() - t
        t = time.perf_counter()
        heard = client.audio.transcriptions.create(model="whisper-1", file=("q.wav", data)).text
        api_s += time.perf_counter() - t
        total += len(audio) / 16000
        wers_api.append(word_error_rate(text, heard))
        wers_local.append(word_error_rate(text, local))
    return {"clips": len(clips), "audio_s": round(total, 2), "api_rtf": round(api_s / total, 4),
            "in_process_rtf": round(local_s / total, 4), "api_overhead_ratio": round(api_s / local_s, 3),
            "api_wer": round(statistics.mean(wers_api), 4), "in_process_wer": round(statistics.mean(wers_local), 4)}


def bench_speech(client, fmt: str, runs: int = 3) -> dict:
    import av

    ttfb, rtf = [], []
    for _ in range(runs):
        t = time.perf_counter()
        first, data = None, b""
        with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=PARAGRAPH,
                                                                response_format=fmt) as r:
            for chunk in r.iter_bytes():
                first = first or time.perf_counter()
                data += chunk
        total = time.perf_counter() - t
        with av.open(io.BytesIO(data)) as f:
            rate = f.streams.audio[0].rate
            seconds = sum(fr.samples for fr in f.decode(audio=0)) / rate
        ttfb.append((first - t) * 1000)
        rtf.append(total / seconds)
    return {"format": fmt, "first_byte_ms_p50": pct(ttfb, 0.5), "rtf_p50": round(statistics.median(rtf), 4),
            "audio_s": round(seconds, 2)}


def bench_realtime(client, say, n: int) -> dict:
    """Each question at real-time pace, then silence until the first answer audio; then cancel."""
    from engine.speech.audio import resample

    latencies, heard, stages = [], [], {}
    with client.beta.realtime.connect(model="local") as conn:
        events: list = []
        lock = threading.Condition()

        def reader() -> None:
            try:
                for event in conn:
                    with lock:
                        events.append((time.perf_counter(), event))
                        lock.notify_all()
            except Exception:  # noqa: BLE001 - the connection closed at the end
                pass

        threading.Thread(target=reader, daemon=True).start()

        def wait_for(kind: str, since: int, limit: float = 60.0):
            deadline = time.monotonic() + limit
            with lock:
                while time.monotonic() < deadline:
                    for i in range(since, len(events)):
                        if events[i][1].type == kind:
                            return i, events[i]
                    lock.wait(0.05)
            return None, None

        wait_for("session.created", 0)
        step = int(24000 * FRAME_S)
        for q in QUESTIONS[:n]:
            pcm = (np.clip(resample(say(q), 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()
            since = len(events)
            start = time.perf_counter()
            for k, i in enumerate(range(0, len(pcm), step * 2)):
                conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + step * 2]).decode())
                time.sleep(max(0.0, start + (k + 1) * FRAME_S - time.perf_counter()))
            end_of_speech = time.perf_counter()
            silence = base64.b64encode(bytes(step * 2)).decode()
            got = None
            while got is None and time.perf_counter() - end_of_speech < 30:
                conn.input_audio_buffer.append(audio=silence)
                time.sleep(FRAME_S)
                with lock:
                    got = next((t for t, e in events[since:] if e.type == "response.audio.delta"), None)
            if got is not None:
                latencies.append((got - end_of_speech) * 1000)
                with lock:
                    for kind in STAGES:
                        t = next((t for t, e in events[since:] if e.type == kind), None)
                        if t is not None:
                            stages.setdefault(kind, []).append((t - end_of_speech) * 1000)
            i, done = wait_for("conversation.item.input_audio_transcription.completed", since, 5)
            heard.append(done[1].transcript if done else "")
            conn.response.cancel()
            wait_for("response.done", since, 30)
            for _ in range(int(PAUSE_S / FRAME_S)):  # a pause, in stream time too (the echo guard's clock)
                conn.input_audio_buffer.append(audio=silence)
                time.sleep(FRAME_S)
    return {"utterances": n, "answered": len(latencies), "eos_to_first_audio_delta_ms_p50": pct(latencies, 0.5),
            "eos_to_first_audio_delta_ms_p90": pct(latencies, 0.9),
            "eos_to_event_ms_p50": {k.split(".", 1)[-1]: pct(v, 0.5) for k, v in stages.items()},
            "transcripts": heard[:3]}


def bench_direct(engine, say, n: int) -> dict:
    """The same questions fed straight into VoiceSession in this process (the browser transport's
    engine side, as bench/voice.py drives it): the WebSocket's own cost is the difference."""
    from engine.events import AudioChunk
    from engine.speech.audio import resample
    from engine.voice_session import VoiceSession

    got: list = []
    session = VoiceSession(engine, lambda e: got.append((time.perf_counter(), e)))
    step, latencies = int(24000 * FRAME_S), []
    silence = bytes(step * 2)

    def paced(frames: list[bytes]) -> None:
        start = time.perf_counter()
        for k, frame in enumerate(frames):
            session.feed(frame, 24000)
            time.sleep(max(0.0, start + (k + 1) * FRAME_S - time.perf_counter()))

    try:
        for q in QUESTIONS[:n]:
            pcm = (np.clip(resample(say(q), 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()
            since = len(got)
            paced([pcm[i:i + step * 2] for i in range(0, len(pcm), step * 2)])
            end_of_speech, first = time.perf_counter(), None
            while first is None and time.perf_counter() - end_of_speech < 30:
                paced([silence])
                first = next((t for t, e in got[since:] if isinstance(e, AudioChunk)), None)
            if first is not None:
                latencies.append((first - end_of_speech) * 1000)
            session.interrupt("bench: next question")
            paced([silence] * int(PAUSE_S / FRAME_S))
    finally:
        session.close()
    return {"eos_to_first_audio_ms_p50": pct(latencies, 0.5), "eos_to_first_audio_ms_p90": pct(latencies, 0.9),
            "answered": len(latencies)}


def bench_chat_audio(client, asr) -> dict:
    from engine.speech.asr import word_error_rate
    from engine.speech.audio import WHISPER_RATE
    from engine.speech.decode import decode

    wers, texts = [], []
    for prompt in ("What is the capital of France?", "Name a colour of the rainbow.", "Say hello to my friend."):
        r = client.chat.completions.create(model="local", max_tokens=40, modalities=["text", "audio"],
                                           audio={"voice": "alloy", "format": "wav"},
                                           messages=[{"role": "user", "content": prompt}])
        m = r.choices[0].message
        with tempfile.NamedTemporaryFile(suffix=".wav") as f:
            f.write(base64.b64decode(m.audio.data))
            f.flush()
            back = asr.transcribe(decode(f.name, WHISPER_RATE)).text
        wers.append(word_error_rate(m.audio.transcript, back))
        texts.append(m.audio.transcript)
    return {"answers": len(wers), "spoken_answer_wer": round(statistics.mean(wers), 4), "examples": texts[:2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=10)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    args = parser.parse_args()
    import openai

    from app.server import Server
    from engine.config import load_config
    from engine.engine import Engine
    from engine.speech.tts import PiperTTS
    from tests.conftest import free_port

    cfg = load_config("cpu", overrides={"data_dir": tempfile.mkdtemp(prefix="omni-apibench-"), "port": str(free_port()),
                                        "max_new_tokens": "60", "temperature": "0"}, env={})
    engine = Engine(cfg)
    engine.start_loading().join()
    server = Server(engine).start()
    voice = PiperTTS("joe-us", variation=0.0)

    def say(text: str) -> np.ndarray:
        from engine.speech.audio import prepare

        return prepare(np.concatenate(list(voice.synthesize(text))), voice.sample_rate, 16000)

    client = openai.OpenAI(base_url=server.url + "/v1", websocket_base_url=server.url.replace("http", "ws") + "/v1",
                           api_key="unused", max_retries=0, timeout=300)
    asr = engine.roles["asr"].get()
    clips = [(q, say(q)) for q in QUESTIONS]
    clips.append((PARAGRAPH, say(PARAGRAPH)))
    try:
        client.audio.speech.create(model="tts-1", voice="alloy", input="Warm up.", response_format="wav")
        load = wait_for_quiet()
        parts = args.parts.split(",")
        result = {"machine_load": load}
        if "transcription" in parts:
            result["transcription"] = bench_transcription(client, asr, clips)
        if "speech" in parts:
            result["speech"] = [bench_speech(client, "wav"), bench_speech(client, "mp3")]
        if "realtime" in parts:
            n = min(args.utterances, len(QUESTIONS))
            result["realtime"] = bench_realtime(client, say, n)
            result["realtime"]["same_run_in_process_voice_session"] = bench_direct(engine, say, n)
        if "chat_audio" in parts:
            result["chat_audio"] = bench_chat_audio(client, asr)
        load_after = float(Path("/proc/loadavg").read_text().split()[0])
        result["machine_load"]["load_1min_after"] = load_after
        browser = ROOT / "bench" / "results" / "voice.json"
        if browser.exists() and "realtime" in result:
            b = json.loads(browser.read_text())
            result["realtime"]["browser_transport_eos_to_first_audio_ms_p50"] = b.get("eos_to_first_audio_ms_p50")
            result["realtime"]["browser_transport_eos_to_first_audio_ms_p90"] = b.get("eos_to_first_audio_ms_p90")
        result["models"] = {"llm": engine.llm().name, "asr": asr.name, "tts": engine.roles["tts"].get().name}
    finally:
        client.close()
        server.close()
        engine.close()
    if len(parts) == len(PARTS):  # a partial run only prints
        (ROOT / "bench" / "results" / "api.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
