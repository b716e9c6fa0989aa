from __future__ import annotations

import logging

from disagg.transfer import base


def test_nixl_used_when_it_loads():
    ok, reason = base.nixl_available()
    assert ok, reason
    assert base.choose_transport("nixl") == "nixl"


def test_fallback_to_object_store_warns(monkeypatch, caplog):
    monkeypatch.setattr(base, "nixl_available", lambda: (False, "ImportError: no UCX"))
    with caplog.at_level(logging.WARNING, logger="disagg.transfer.base"):
        assert base.choose_transport("nixl") == "object_store"
    assert "no UCX" in caplog.text
    assert "object store" in caplog.text


def test_object_store_requested_needs_no_nixl(monkeypatch):
    monkeypatch.setattr(base, "nixl_available", lambda: (_ for _ in ()).throw(AssertionError("not called")))
    assert base.choose_transport("object_store") == "object_store"
