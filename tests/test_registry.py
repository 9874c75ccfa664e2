import pytest

from generators import registry


def test_registry_refuses_duplicates_and_reports_why_unavailable(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {})
    assert registry.task_status("image") == (False, registry.task_status("image")[1])
    assert "no text-to-image backend" in registry.task_status("image")[1]

    @registry.register("image", "a", available=lambda: (False, "weights absent; set --image-model"))
    class A:
        pass

    with pytest.raises(ValueError, match="already registered"):
        registry.register("image", "a")(A)
    with pytest.raises(ValueError, match="unknown generator task"):
        registry.register("smell", "x")
    assert registry.task_status("image") == (False, "a: weights absent; set --image-model")

    @registry.register("image", "b")
    class B:
        pass

    assert registry.task_status("image") == (True, "b")
    assert [e.name for e in registry.entries("image")] == ["a", "b"]
