"""The OpenAI audio endpoints driven by the official openai client, as a user would:
real Whisper (whisper-tiny.en) and the packaged Piper voice; the tiny LLM answers."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest

from engine.speech.asr import word_error_rate
from engine.speech.audio import write_wav
from tests.conftest import running_server

SPEECH = {"asr_backend": "faster-whisper", "tts_backend": "piper", "vad.backend": "silero"}
QUESTION = "What is the capital of France?"


_SHARED: dict = {}


@pytest.fixture(scope="session")
def audio_server(tmp_path_factory, request):
    """One app with real speech roles for this file and tests/test_realtime.py (which imports this
    fixture): starting it loads Whisper, Piper and Silero, so it is started once per run."""
    if "server" not in _SHARED:
        # answers long enough (120 tokens) for test_realtime to talk over one
        context = running_server(tmp_path_factory.mktemp("audio"), max_new_tokens="120", context_tokens="4096",
                                 **SPEECH)
        _SHARED["server"] = context.__enter__()
        request.session.addfinalizer(lambda: context.__exit__(None, None, None))
    return _SHARED["server"]


@pytest.fixture
def client(audio_server):
    c = openai.OpenAI(base_url=audio_server.url + "/v1", api_key="unused", max_retries=0)
    yield c
    c.close()


@pytest.fixture
def question_wav(say, tmp_path):
    return write_wav(tmp_path / "question.wav", say(QUESTION), 16000)


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    """Any served format -> mono float32 and its rate (through PyAV, as a player would)."""
    import av

    with av.open(io.BytesIO(data)) as f:
        rate = f.streams.audio[0].rate
        frames = [fr.to_ndarray().astype(np.float32).reshape(fr.samples, -1).mean(axis=1)
                  if fr.format.is_packed else fr.to_ndarray().astype(np.float32).mean(axis=0)
                  for fr in f.decode(audio=0)]
    x = np.concatenate(frames)
    return (x / 32768.0 if np.abs(x).max() > 2 else x), rate


def test_transcription_json_srt_and_verbose(client, question_wav):
    with open(question_wav, "rb") as f:
        text = client.audio.transcriptions.create(model="whisper-1", file=f).text
    wer = word_error_rate(QUESTION, text)
    print(f"WER on the recorded question: {wer:.2f} ({text!r})")
    assert wer <= 0.2
    with open(question_wav, "rb") as f:
        srt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt")
    assert srt.startswith("1\n00:00:00,") and " --> " in srt and "France" in srt
    with open(question_wav, "rb") as f:
        verbose = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                                     timestamp_granularities=["segment"])
    assert verbose.language == "english" and verbose.duration == pytest.approx(len(open(question_wav, "rb").read()[44:]) / 32000, abs=0.05)
    seg = verbose.segments[0]
    assert 0 <= seg.start < seg.end <= verbose.duration + 0.01 and "France" in seg.text
    with open(question_wav, "rb") as f:
        vtt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="vtt")
    assert vtt.startswith("WEBVTT") and "00:00:00." in vtt


@pytest.mark.parametrize("fmt", ["wav", "mp3"])
def test_streamed_speech_transcribes_back(client, tmp_path, fmt):
    text = "The quick brown fox jumps over the lazy dog. It was a sunny day."
    out = tmp_path / f"speech.{fmt}"
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=text,
                                                            response_format=fmt) as response:
        assert response.headers["content-type"] == ("audio/wav" if fmt == "wav" else "audio/mpeg")
        chunks = list(response.iter_bytes())
    out.write_bytes(b"".join(chunks))
    assert len(chunks) >= 2  # sent as it was made
    with open(out, "rb") as f:
        heard = client.audio.transcriptions.create(model="whisper-1", file=f).text
    assert word_error_rate(text, heard) <= 0.25, heard


@pytest.mark.parametrize("fmt", ["flac", "opus", "aac", "pcm"])
def test_speech_formats_decode(client, fmt):
    data = client.audio.speech.create(model="tts-1", voice="joe-us", input="Hello there.", response_format=fmt).content
    if fmt == "pcm":
        x, rate = np.frombuffer(data, "<i2").astype(np.float32) / 32768, 24000
    else:
        x, rate = _decode(data)
    assert 0.3 < len(x) / rate < 3 and np.abs(x).max() > 0.05


def test_bad_inputs_are_400s_that_say_why(client, audio_server, tmp_path):
    with pytest.raises(openai.BadRequestError, match="unknown voice 'nobody'.*joe-us.*alloy"):
        client.audio.speech.create(model="tts-1", voice="nobody", input="hi")
    with pytest.raises(openai.BadRequestError, match="input is empty"):
        client.audio.speech.create(model="tts-1", voice="alloy", input="   ")
    with pytest.raises(openai.BadRequestError, match="limit is 4,096"):
        client.audio.speech.create(model="tts-1", voice="alloy", input="word " * 1000)
    with pytest.raises(openai.BadRequestError, match="response_format 'ogg'.*mp3"):
        client.audio.speech.create(model="tts-1", voice="alloy", input="hi", response_format="ogg")
    corrupt = tmp_path / "broken.wav"
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(200)))
    with pytest.raises(openai.BadRequestError, match="broken.wav") as err:
        client.audio.transcriptions.create(model="whisper-1", file=corrupt.open("rb"))
    assert str(tmp_path) not in str(err.value)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(openai.BadRequestError, match="empty.wav is empty"):
        client.audio.transcriptions.create(model="whisper-1", file=empty.open("rb"))
    with pytest.raises(openai.BadRequestError, match="word timestamps"):
        client.audio.transcriptions.create(model="whisper-1", file=corrupt.open("rb"),
                                           response_format="verbose_json", timestamp_granularities=["word"])
    with pytest.raises(openai.BadRequestError, match="English only"):
        client.audio.translations.create(model="whisper-1", file=corrupt.open("rb"))
    r = httpx.post(audio_server.url + "/v1/audio/transcriptions", content=b"not multipart")
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]


def test_ten_minutes_of_silence_is_an_empty_transcript(client, tmp_path):
    wav = write_wav(tmp_path / "quiet.wav", np.zeros(16000 * 600, np.float32), 16000)
    with open(wav, "rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json")
    assert result.text == "" and result.duration == pytest.approx(600, abs=0.1)


def test_wrong_token_is_401(tmp_path, question_wav):
    with running_server(tmp_path / "tok", auth_token="a-long-enough-test-token") as srv:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.audio.speech.create(model="tts-1", voice="alloy", input="hi")
        with pytest.raises(openai.AuthenticationError):
            bad.audio.transcriptions.create(model="whisper-1", file=question_wav.open("rb"))
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="a-long-enough-test-token", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="speech synthesis is off"):  # past the token
            good.audio.speech.create(model="tts-1", voice="alloy", input="Hi.")
        bad.close()
        good.close()


def test_endpoints_show_in_the_docs(client, audio_server):
    paths = httpx.get(audio_server.url + "/v1/openapi.json").json()["paths"]
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/audio/speech", "/v1/realtime"):
        assert path in paths
    body = paths["/v1/audio/speech"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"input", "voice", "response_format", "speed"} <= set(body["properties"])


def test_input_audio_in_chat_is_heard(client, question_wav):
    data = base64.b64encode(question_wav.read_bytes()).decode()
    r = client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}])
    typed = client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": QUESTION}])
    assert abs(r.usage.prompt_tokens - typed.usage.prompt_tokens) <= 3  # the question was its transcript


def test_chat_with_spoken_answer_transcribes_back(client, tmp_path):
    r = client.chat.completions.create(model="tiny", max_tokens=12, modalities=["text", "audio"],
                                       audio={"voice": "alloy", "format": "wav"},
                                       messages=[{"role": "user", "content": "Say something"}])
    message = r.choices[0].message
    assert message.audio.transcript == message.content and message.content.strip()
    wav = tmp_path / "answer.wav"
    wav.write_bytes(base64.b64decode(message.audio.data))
    with open(wav, "rb") as f:
        heard = client.audio.transcriptions.create(model="whisper-1", file=f).text
    # the tiny LLM writes random tokens ('Q[i\\h'), so only that it is heard as speech is checked here;
    # bench/api.py measures the round trip's WER with the real cpu-profile LLM
    assert heard.strip()


def test_streamed_chat_sends_audio_deltas(client):
    stream = client.chat.completions.create(model="tiny", max_tokens=12, modalities=["text", "audio"],
                                            audio={"voice": "alloy", "format": "pcm16"}, stream=True,
                                            messages=[{"role": "user", "content": "Say something"}])
    text, pcm = [], b""
    for chunk in stream:
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta is None:
            continue
        text.append(delta.content or "")
        if delta.audio is not None and delta.audio.data:
            pcm += base64.b64decode(delta.audio.data)
    assert "".join(text).strip() and len(pcm) > 24000  # over half a second at 24 kHz
    with pytest.raises(openai.BadRequestError, match="audio.format 'ogg'"):
        client.chat.completions.create(model="tiny", max_tokens=4, modalities=["text", "audio"],
                                       audio={"voice": "alloy", "format": "ogg"},
                                       messages=[{"role": "user", "content": "hi"}])
