"""FlowRecorder: the copy written for replay is masked; the live flow is not."""

from __future__ import annotations

from pathlib import Path

from mitmproxy import http, io
from mitmproxy.test import taddons, tflow

from fleetgate.addons.record import MASK, FlowRecorder, masked_copy


def _flow() -> http.HTTPFlow:
    f = tflow.tflow(resp=True)
    f.request.headers.update({"Authorization": "Bearer sk-1", "X-Api-Key": "sk-2",
                              "X-Goog-Api-Key": "sk-3", "Cookie": "sid=sk-4",
                              "Mcp-Session-Id": "s-1", "Accept": "application/json"})
    assert f.response is not None
    f.response.headers["Set-Cookie"] = "sid=sk-5"
    f.metadata["fleetgate.claims"] = {"sub": "a-1"}
    return f


def test_masked_copy_masks_credentials_and_leaves_the_live_flow_alone() -> None:
    live = _flow()
    copy = masked_copy(live)
    for name in ("Authorization", "X-Api-Key", "X-Goog-Api-Key", "Cookie"):
        assert copy.request.headers[name] == MASK
    assert copy.response is not None and copy.response.headers["Set-Cookie"] == MASK
    assert (copy.request.headers["Mcp-Session-Id"], copy.request.headers["Accept"]) == (
        "s-1", "application/json")
    assert live.request.headers["Authorization"] == "Bearer sk-1"
    assert live.response is not None and live.response.headers["Set-Cookie"] == "sid=sk-5"
    assert copy.metadata["fleetgate.claims"] == {"sub": "a-1"}


def test_records_each_finished_flow_once(tmp_path: Path) -> None:
    rec = FlowRecorder()
    path = tmp_path / "f.mitm"
    with taddons.context(rec) as tctx:
        tctx.configure(rec, fleetgate_record=str(path))
        f = _flow()
        rec.response(f)
        rec.error(f)  # the same flow again: not twice
        rec.response(_flow())
        rec.done()  # mitmproxy's shutdown closes the file (taddons does not call done)
    data = path.read_bytes()
    assert b"sk-1" not in data and b"sk-5" not in data
    assert path.stat().st_mode & 0o777 == 0o600
    with path.open("rb") as fo:
        assert len(list(io.FlowReader(fo).stream())) == 2
