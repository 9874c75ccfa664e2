"""What a backend can do is declared on its contract, never probed (issue 13): no
`hasattr`/`getattr` in engine/ or app/ asks one of our own objects for something a
contract declares. Reflection over config dataclasses and over third-party objects
(transformers models and configs, torch) is not probing our contracts and stays."""
from __future__ import annotations

import re
from pathlib import Path

from engine.llm.base import LLMBackend
from engine.speech.tts import TTS
from generators.base import Backend

ROOT = Path(__file__).resolve().parents[1]
# (a lookahead, so that a probe nested in another one's first argument is found too)
PROBE = re.compile(r"\b(?:hasattr|getattr)\((?=(?:[^,()]|\([^()]*\))+,\s*[\"'](\w+)[\"'])")
# what was once probed for, besides what the contracts declare
ONCE_PROBED = {"tokenizer", "speak", "park", "ready", "unload", "can_do", "media_kinds", "decode_path", "talker_model"}
# (file, attribute): why it is not a capability probe
ALLOWED = {
    ("engine/roles.py", "close"): "a role holds any of several kinds of model (ASR, VAD, TTS, LLM, the perceiver's); "
                                  "only some hold resources to free (roles.py is being edited in another session)",
}


def declared() -> set[str]:
    names = set(ONCE_PROBED)
    for contract in (LLMBackend, TTS, Backend):
        names |= {n for n in vars(contract) if not n.startswith("__")}
    return names


def probes() -> list[tuple[str, int, str]]:
    out = []
    for path in sorted([*(ROOT / "engine").rglob("*.py"), *(ROOT / "app").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            out += [(rel, number, m.group(1)) for m in PROBE.finditer(line)]
    return out


def test_the_grep_sees_probes():
    """The pattern finds the forms it must (nested calls, dotted objects, default values)."""
    line = 'x = getattr(getattr(self, "a", None).b, "park", None) or hasattr(llm.inner, "tokenizer")'
    assert sorted(m.group(1) for m in PROBE.finditer(line)) == ["a", "park", "tokenizer"]
    assert {"park", "can_do", "resident", "from_trace", "media_kinds", "constrained"} <= declared()


def test_no_capability_is_probed_in_engine_or_app():
    found = [f"{rel}:{number}: probes {name!r}" for rel, number, name in probes()
             if name in declared() and (rel, name) not in ALLOWED]
    assert not found, "declare it on the contract instead:\n" + "\n".join(found)
