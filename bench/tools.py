#!/usr/bin/env python3
"""Media tools on the cpu profile: how often the right tool is chosen, how often
the LLM's constrained call is valid, and how fast the classical generators are.

 - routing accuracy on the request set (tests/data/tool_requests.json, 46
   varied requests incl. plain chat) for the three routers side by side:
   rules only, LLM only (SmolLM2-135M choosing by likelihood), hybrid;
 - the LLM writing every argument under the tool's grammar (arguments=llm):
   share of calls that parse and validate (constrained) vs the same model
   writing JSON freely (plain generation, then json.loads + validation);
 - latency of each classical backend on media made here.
Prints one JSON object as its last line and writes bench/results/tools.json.

    python bench/tools.py
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REQUESTS = json.loads((ROOT / "tests" / "data" / "tool_requests.json").read_text())
# written after the rules, never tuned against: the honest accuracy figure
HELDOUT = json.loads((ROOT / "tests" / "data" / "tool_requests_heldout.json").read_text())


def routing(engine, requests: list, prefix: str = "") -> dict:
    from engine.tools.plan import CHAT, llm_choice, rule_choice

    llm = engine.roles["llm"].get()
    hits = {"rules": 0, "llm": 0, "hybrid": 0}
    llm_ms, consulted = [], 0
    misses = {"rules": [], "llm": [], "hybrid": []}
    for req in requests:
        kinds = set(req["media"])
        rules = rule_choice(req["text"], kinds)
        start = time.perf_counter()
        by_llm = llm_choice(llm, req["text"], kinds)
        llm_ms.append((time.perf_counter() - start) * 1000)
        hybrid = rules if rules is not None else by_llm
        consulted += rules is None
        for name, got in (("rules", rules or CHAT), ("llm", by_llm), ("hybrid", hybrid)):
            if got == req["tool"]:
                hits[name] += 1
            else:
                misses[name].append(f"{req['text']} -> {got}")
    n = len(requests)
    out = {"requests": n, **{f"tool_accuracy_{k}": round(v / n, 3) for k, v in hits.items()},
           "hybrid_asked_llm": consulted, "llm_choice_ms_p50": round(statistics.median(llm_ms), 1),
           "misses_hybrid": misses["hybrid"]}
    return {prefix + k: v for k, v in out.items()}


def validity(engine) -> dict:
    from engine.llm import structured
    from engine.tools.plan import _schema_with_refs
    from generators.base import GenerationError, validate
    from generators.tools import TOOLS

    llm = engine.roles["llm"].get()
    media = []
    ok_c, ok_free, n, ms = 0, 0, 0, []
    for req in [r for r in REQUESTS if r["tool"] != "chat"][::2]:
        tool = TOOLS[req["tool"]]
        schema = _schema_with_refs(tool.schema, tool.refs, media)
        messages = [{"role": "system", "content": f"Reply with only the JSON arguments of the {req['tool']} tool "
                     f"({tool.description}). JSON schema: {json.dumps(tool.schema)[:600]}"},
                    {"role": "user", "content": req["text"]}]
        n += 1
        start = time.perf_counter()
        try:
            args, _ = structured.json_call(llm, messages, schema)
            validate(tool.schema, args)
            ok_c += 1
        except (ValueError, GenerationError):
            pass
        ms.append((time.perf_counter() - start) * 1000)
        from engine.llm.base import GenParams

        text = "".join(d.text for d in llm.generate(messages, params=GenParams(max_new_tokens=200, temperature=0)))
        llm.forget()
        try:
            start_i = text.index("{")
            validate(tool.schema, json.loads(text[start_i:text.rindex("}") + 1]))
            ok_free += 1
        except (ValueError, GenerationError):
            pass
    return {"calls": n, "valid_constrained": round(ok_c / n, 3), "valid_free_json": round(ok_free / n, 3),
            "constrained_call_ms_p50": round(statistics.median(ms), 1)}


def generators_latency(tmp: Path) -> dict:
    import subprocess

    from PIL import Image

    from generators.audio_synth import SynthAudio
    from generators.ffmpeg import ffmpeg_exe
    from generators.image_opencv import OpenCVImageEditor
    from generators.scene_trimesh import TrimeshScene
    from generators.video_ffmpeg import FFmpegVideoEditor

    class Never:
        cancelled = False

    photo = tmp / "photo.png"
    import cv2

    rng = np.random.default_rng(0)  # a 1080p "photo": sky-to-ground gradient, a subject in the middle, sensor noise
    img = np.zeros((1080, 1920, 3), np.float32)
    img[:540] = np.linspace([120, 170, 235], [190, 210, 240], 540)[:, None, :]
    img[540:] = np.linspace([70, 140, 60], [40, 100, 40], 540)[:, None, :]
    cv2.ellipse(img, (960, 600), (260, 360), 0, 0, 360, (200, 60, 50), -1)
    img += rng.normal(0, 6, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(photo)
    clip = tmp / "clip.mp4"
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=640x360:rate=25",
                    "-f", "lavfi", "-i", "sine=frequency=440", "-t", "10", "-pix_fmt", "yuv420p", str(clip)], check=True)
    jobs = {
        "edit_image_crop_caption_1080p": (OpenCVImageEditor(), {"instruction": "crop it to a square and add the caption 'Summer'", "operations": []}, [photo]),
        "edit_image_background_blur_1080p": (OpenCVImageEditor(), {"instruction": "blur the background", "operations": []}, [photo]),
        "edit_video_trim_10s_360p": (FFmpegVideoEditor(), {"operation": "trim", "start_s": 2.0, "end_s": 6.0, "factor": 2, "count": 4, "audio": "", "video": "clip.mp4"}, [clip]),
        "edit_video_gif_10s_360p": (FFmpegVideoEditor(), {"operation": "to_gif", "start_s": 0, "end_s": 0, "factor": 2, "count": 4, "audio": "", "video": "clip.mp4"}, [clip]),
        "model3d_snowman": (TrimeshScene(), {"prompt": "a snowman", "shapes": [], "image": ""}, []),
        "audio_rain_10s": (SynthAudio(), {"prompt": "rain", "sound": "auto", "seconds": 10, "notes": "", "frequency": 440, "video": ""}, []),
        "audio_rain_onto_10s_video": (SynthAudio(), {"prompt": "rain", "sound": "auto", "seconds": 10, "notes": "", "frequency": 440, "video": "clip.mp4"}, [clip]),
    }
    out = {}
    for name, (backend, request, inputs) in jobs.items():
        times = []
        for i in range(3):
            dest = tmp / f"{name}-{i}"
            dest.mkdir()
            start = time.perf_counter()
            backend.run(request, inputs, dest, lambda s, f: None, Never())
            times.append((time.perf_counter() - start) * 1000)
        out[name + "_ms"] = round(statistics.median(times), 1)
    return out


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--routing-only", action="store_true", help="only the routing accuracy (no timings)")
    args = ap.parse_args()
    from engine.config import load_config
    from engine.engine import Engine

    tmp = Path(tempfile.mkdtemp(prefix="omni-tools-"))
    engine = Engine(load_config("cpu", overrides={"data_dir": str(tmp / "data")}, env={}))
    engine.start_loading().join()
    result = {"llm": engine.roles["llm"].get().name, **routing(engine, REQUESTS),
              **routing(engine, HELDOUT, "heldout_")}
    out = ROOT / "bench" / "results" / "tools.json"
    if args.routing_only:  # refresh the routing figures, keep the rest of the last full run
        result = {**(json.loads(out.read_text()) if out.exists() else {}), **result}
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        return
    result.update({**validity(engine), **generators_latency(tmp)})
    engine.close()
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
