import pytest

from generators import registry
from generators.base import Backend


def test_registry_refuses_duplicates_and_reports_why_unavailable(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {})
    assert registry.task_status("image") == (False, registry.task_status("image")[1])
    assert "no text-to-image backend" in registry.task_status("image")[1]

    @registry.register("image", "a", available=lambda: (False, "weights absent; set --image-model"))
    class A(Backend):
        pass

    with pytest.raises(ValueError, match="already registered"):
        registry.register("image", "a")(A)
    with pytest.raises(ValueError, match="unknown generator task"):
        registry.register("smell", "x")
    with pytest.raises(ValueError, match="must subclass generators.base.Backend"):
        registry.register("image", "c")(type("C", (), {}))
    assert registry.task_status("image") == (False, "a: weights absent; set --image-model")

    @registry.register("image", "b")
    class B(Backend):
        pass

    assert registry.task_status("image") == (True, "b")
    assert [e.name for e in registry.entries("image")] == ["a", "b"]


def test_a_backend_that_failed_to_import_shows_in_the_status(engine, monkeypatch):
    """registry.load_backends keeps going when one generator module fails to import; the
    status panel and /v1/status say which and why instead of the backend silently missing."""
    from engine.status import status, status_markdown
    from generators import registry

    monkeypatch.setitem(registry._FAILED, "generators.image_broken", "ImportError: no module named 'libfoo'")
    report = status(engine)
    assert report["failed_backends"]["generators.image_broken"] == "ImportError: no module named 'libfoo'"
    assert "| generators.image_broken | ⚠️ failed to import | ImportError: no module named 'libfoo' |" \
        in status_markdown(report)
