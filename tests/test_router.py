"""Output routing: which tool a message asks for, what its references mean, and
that constrained decoding always yields a valid call (even from a random model)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.tools import plan as tool_plan
from engine.config import load_config
from engine.engine import Engine
from engine.media import MediaRecord
from engine.session import Session, Turn
from generators.base import Backend, RequestError, validate
from generators.tools import TOOLS

REQUESTS = json.loads((Path(__file__).parent / "data" / "tool_requests.json").read_text())


@pytest.mark.parametrize("req", REQUESTS, ids=[r["text"][:40] for r in REQUESTS])
def test_clear_wording_picks_the_tool_and_arguments(req):
    got = tool_plan.rule_choice(req["text"], set(req["media"])) or tool_plan.CHAT
    assert got == req["tool"]
    if got != tool_plan.CHAT:
        args = tool_plan.words_arguments(got, req["text"])
        for key, value in req.get("args", {}).items():
            assert args[key] == pytest.approx(value), key
        if "video" not in req["media"] or got != "generate_audio":
            validate(TOOLS[got].schema, {k: v for k, v in args.items()})


def _rec(name, kind="image"):
    return MediaRecord(name * 4, kind, "image/png", f"/x/{name}", 1, name)


def test_references_resolve_to_the_right_file():
    media = [("user", _rec("beach.png")), ("assistant", _rec("edit-image-opencv.png")),
             ("user", _rec("clip.mp4", "video")), ("assistant", _rec("image-diffusion.png"))]
    assert tool_plan.resolve("last", "image", media, "make it bluer").name == "image-diffusion.png"
    assert tool_plan.resolve("last", "image", media, "rotate the first image").name == "beach.png"
    assert tool_plan.resolve("last", "image", media, "crop the photo I sent").name == "beach.png"
    assert tool_plan.resolve("last", "image", media, "undo: go back to the previous one").name == "edit-image-opencv.png"
    assert tool_plan.resolve("beach.png", "image", media).name == "beach.png"
    assert tool_plan.resolve("last", "image", media, "blur beach").name == "beach.png"
    assert tool_plan.resolve("last", "video", media).name == "clip.mp4"
    assert tool_plan.resolve("last", "audio", media) is None


def _engine(tmp_path, **over):
    return Engine(load_config("tiny", overrides={"data_dir": str(tmp_path / "data"), **over}, env={}))


def test_constrained_calls_from_a_random_model_are_always_valid(tmp_path):
    """router=llm, arguments=llm on the tiny random model: it may choose anything, but
    what it produces parses, validates, and refers only to files that exist."""
    eng = _engine(tmp_path, **{"generators.router": "llm", "generators.arguments": "llm"})
    try:
        media = [("user", _rec("beach.png")), ("user", _rec("clip.mp4", "video"))]
        chosen = set()
        for req in REQUESTS[::3]:
            try:
                plan = tool_plan.plan(eng, req["text"], media)
            except RequestError:
                continue  # e.g. it chose a tool needing a kind of file that is not there: said plainly
            if plan is None:
                chosen.add("chat")
                continue
            chosen.add(plan.name)
            assert plan.chosen_by == "llm"
            validate(TOOLS[plan.name].schema, plan.arguments)
            for fld in ("image", "video"):
                if plan.arguments.get(fld):
                    assert plan.arguments[fld] in ("beach.png", "clip.mp4")
        assert chosen  # it always answered one of the allowed choices
        llm = eng.roles["llm"].get()
        from engine.llm import structured

        for name, tool in TOOLS.items():  # every schema, straight from the decoder
            args, n = structured.json_call(llm, [{"role": "user", "content": name}], tool.schema)
            validate(tool.schema, args)
            assert n > 0
    finally:
        eng.close()


def _photo(path: Path, size=(300, 200)) -> Path:
    w, h = size
    im = np.zeros((h, w, 3), np.uint8)
    im[: h // 2] = (90, 150, 235)  # a blue sky over green ground
    im[h // 2:] = (40, 160, 40)
    im[5, 5] = (255, 0, 0)
    Image.fromarray(im).save(path)
    return path


def _events(session, turn):
    return [e.to_dict() for e in session.submit(turn)]


def test_edit_then_refer_back_and_errors_keep_the_conversation(tmp_path):
    eng = _engine(tmp_path)
    try:
        s = Session(eng)
        photo = _photo(tmp_path / "beach.png")
        ev = _events(s, Turn("crop it to a square and add the caption 'Summer'", attachments=(str(photo),)))
        call = next(e for e in ev if e["type"] == "tool_call")
        assert call["name"] == "edit_image" and call["arguments"]["image"] == "beach.png"
        assert any(e["type"] == "progress" for e in ev)
        result = next(e for e in ev if e["type"] == "media_result")
        assert result["kind"] == "image" and result["meta"]["backend"] == "opencv"
        assert Image.open(result["path"]).size == (200, 200)
        # "it" is now the edited square; make it grayscale
        ev = _events(s, Turn("make it black and white"))
        second = next(e for e in ev if e["type"] == "media_result")
        assert next(e for e in ev if e["type"] == "tool_call")["arguments"]["image"] == "beach-crop-text.png"  # named from the edit
        px = np.asarray(Image.open(second["path"]).convert("RGB"))
        assert px.shape[:2] == (200, 200) and np.all(px[..., 0] == px[..., 1])
        # "the first photo" still means the original
        ev = _events(s, Turn("rotate the first photo 90 degrees"))
        assert Image.open(next(e for e in ev if e["type"] == "media_result")["path"]).size == (200, 300)
        # an impossible edit: a clear message, nothing lost, the next turn works
        ev = _events(s, Turn("crop it to 5000x5000 at 4000,4000"))
        assert not any(e["type"] == "media_result" for e in ev)
        text = "".join(e["text"] for e in ev if e["type"] == "text_delta")
        assert "can't" in text.lower()
        turns = eng.store.turns(s.id)
        assert [t.status for t in turns if t.role == "assistant"] == ["complete", "complete", "complete", "error"]
        assert sum(len(t.media) for t in turns) == 4  # the photo and three results, all kept
        assert any(e["type"] == "media_result" for e in _events(s, Turn("flip it horizontally")))
    finally:
        eng.close()


def test_nothing_to_edit_says_so(tmp_path):
    eng = _engine(tmp_path)
    try:
        s = Session(eng)
        ev = _events(s, Turn("trim the video to the first 2 seconds"))  # no video: rules see no edit
        assert not any(e["type"] == "media_result" for e in ev)
        plan = tool_plan.plan(eng, "make a 3D model of this", [("user", _rec("song.wav", "audio"))])
        assert plan.name == "generate_3d" and not plan.inputs  # audio cannot be its input
        with pytest.raises(RequestError, match="can't make a 3D model from audio"):
            tool_plan.plan(eng, "turn this into a 3D model", [], attached=(_rec("song.wav", "audio"),))
        with pytest.raises(RequestError, match="between 0.5 and 20"):
            tool_plan.plan(eng, "a 10-minute video of waves", [])
    finally:
        eng.close()


class _Crashing(Backend):
    task, name = "edit_image", "crashy"

    def __init__(self, exc):
        self.exc = exc

    def run(self, request, inputs, out_dir, progress, cancel):
        progress("working", 0.5)
        raise self.exc


class _Slow(Backend):
    task, name = "edit_image", "slow"

    def run(self, request, inputs, out_dir, progress, cancel):
        import time

        from generators.base import check

        for i in range(200):
            check(cancel)
            progress("step", i / 200)
            time.sleep(0.01)
        raise AssertionError("not cancelled")


@pytest.mark.parametrize("exc,words", [(RuntimeError("boom"), "crashed"),
                                       (RuntimeError("CUDA out of memory"), "out of memory"),
                                       (MemoryError(), "out of memory")])
def test_a_crashing_generator_gives_a_clear_message(tmp_path, monkeypatch, exc, words):
    eng = _engine(tmp_path)
    try:
        monkeypatch.setattr(eng.generators, "pick", lambda *a: _Crashing(exc))
        s = Session(eng)
        ev = _events(s, Turn("blur the background", attachments=(str(_photo(tmp_path / "p.png")),)))
        text = "".join(e["text"] for e in ev if e["type"] == "text_delta")
        assert words in text and ev[-1]["type"] == "done"
        assert eng.store.turns(s.id)[-1].status == "error"
        assert len(eng.store.turns(s.id)[0].media) == 1  # the photo is intact
    finally:
        eng.close()


def test_stop_cancels_a_running_generator(tmp_path, monkeypatch):
    from engine.events import CancelToken

    eng = _engine(tmp_path)
    try:
        monkeypatch.setattr(eng.generators, "pick", lambda *a: _Slow())
        s, cancel, seen = Session(eng), CancelToken(), []
        for e in s.submit(Turn("blur it", attachments=(str(_photo(tmp_path / "p.png")),)), cancel):
            seen.append(e.to_dict())
            if e.type == "progress" and e.fraction > 0.05:
                cancel.cancel("stop pressed")
        assert seen[-1]["type"] == "done" and seen[-1]["interrupted"]
        assert "cancelled" in "".join(e.get("text", "") for e in seen)
        assert eng.store.turns(s.id)[-1].status == "interrupted"
    finally:
        eng.close()


def test_diffusion_backends_run_through_the_engine(tmp_path):
    """The tiny profile's diffusion generators (tiny random pipelines) behind the same routing."""
    eng = _engine(tmp_path, **{"generators.router": "rules"})
    try:
        s = Session(eng)
        ev = _events(s, Turn("draw a lighthouse at dusk, 64x64"))
        result = next(e for e in ev if e["type"] == "media_result")
        assert result["meta"]["backend"] == "diffusion" and Image.open(result["path"]).size == (64, 64)
        fractions = [e["fraction"] for e in ev if e["type"] == "progress"]
        assert fractions and fractions[-1] == pytest.approx(1.0)
        # words the exact editor cannot read go to the instruction-edit model
        ev = _events(s, Turn("make it look like an oil painting"))
        assert next(e for e in ev if e["type"] == "media_result")["meta"]["backend"] == "instruct-pix2pix"
        # words it can read stay exact
        ev = _events(s, Turn("flip it horizontally"))
        assert next(e for e in ev if e["type"] == "media_result")["meta"]["backend"] == "opencv"
    finally:
        eng.close()


def test_spoken_words_as_audio_and_as_a_voice_over(tmp_path):
    """'say ...' as a sound file uses the engine's own voice (Piper), also onto a video."""
    import soundfile as sf

    from generators.ffmpeg import probe

    eng = _engine(tmp_path, tts_backend="piper")
    try:
        s = Session(eng)
        ev = _events(s, Turn("make an audio file saying 'welcome aboard, everyone'"))
        result = next(e for e in ev if e["type"] == "media_result")
        assert result["meta"]["backend"] == "tts" and result["kind"] == "audio"
        assert 0.8 < sf.info(result["path"]).duration < 5
        clip = tmp_path / "clip.mp4"
        from generators.ffmpeg import ffmpeg_exe
        import subprocess

        subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10",
                        "-t", "3", "-pix_fmt", "yuv420p", str(clip)], check=True)
        ev = _events(s, Turn("add a voice-over saying 'this is our garden' to this video", attachments=(str(clip),)))
        result = next(e for e in ev if e["type"] == "media_result")
        info = probe(result["path"])
        assert result["kind"] == "video" and info["has_audio"] and info["duration_s"] == pytest.approx(3, abs=0.2)
    finally:
        eng.close()


def test_unavailable_llm_falls_back_to_rules_and_words(tmp_path):
    """arguments=llm (the gpu profile) with a model that cannot load: the call is still made
    from the rules and the user's words, not an exception out of the turn."""
    eng = _engine(tmp_path, llm="no/such-model", **{"generators.arguments": "llm", "generators.router": "hybrid"})
    try:
        plan = tool_plan.plan(eng, "crop it to a square", [("user", _rec("beach.png"))])
        assert plan.name == "edit_image" and plan.arguments["instruction"] == "crop it to a square"
        assert plan.chosen_by == "rules"
    finally:
        eng.close()
