"""``fleetgate run --web`` end to end: mitmweb shows who sent each flow.

The gateway is started the way an operator does (the CLI execs mitmweb); its flows are read
back from mitmweb's own JSON API (``/flows``, ``/options``) and its server-side filter
(``/flows/dump?filter=``), with the password mitmweb asks for.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
from mitmproxy import http, io

from harness import (
    ADMIN_TOKEN,
    SECRET,
    Gateway,
    Upstream,
    free_port,
    resolve_entries,
    token,
    wait_until,
)

WEB_PASSWORD = "e2e-web-password-0123456789"


@dataclass
class CliWebGateway(Gateway):
    """``fleetgate run --web`` instead of a bare mitmdump."""

    web_port: int = 0

    def argv(self) -> list[str]:
        secret = self.workdir / "jwt.secret"
        secret.write_bytes(SECRET)
        self.web_port = free_port()
        argv = [sys.executable, "-m", "fleetgate.cli", "run", "--web",
                "--rules", str(self.rules), "--listen-host", "127.0.0.1", "--listen-port", "0",
                "--metrics", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                "--confdir", str(self.confdir), "--decision-log", str(self.decision_log),
                "--jwt-secret-file", str(secret), "--state-dir", "",
                "--", "--web-port", str(self.web_port),
                "--set", f"web_password={WEB_PASSWORD}",
                "--set", f"fleetgate_admin_token={ADMIN_TOKEN}",
                "--set", f"ssl_verify_upstream_trusted_ca={self.upstream_ca}"]
        for entry in resolve_entries():
            argv += ["--set", f"fleetgate_resolve={entry}"]
        return argv

    def web(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.web_port}{path}", timeout=10,
                         headers={"Authorization": f"Bearer {WEB_PASSWORD}"})


def test_mitmweb_lists_every_flow_with_who_sent_it(
        rules_file: Path, upstream: Upstream, tmp_path: Path, confdir: Path,
        upstream_ca_file: Path) -> None:
    workdir = tmp_path / "web"
    workdir.mkdir()
    gw = CliWebGateway(rules=rules_file, workdir=workdir, confdir=confdir,
                       upstream_ca=upstream_ca_file).start()
    try:
        with gw.client(token("research-bot", session_id="s-123")) as c:
            assert c.get(upstream.url + "/allowed").status_code == 200
            assert c.get(upstream.url + "/x/delete").status_code == 403
        with gw.client(token("other-bot", role="other")) as c:
            assert c.get(upstream.url + "/other").status_code == 200

        # the comment column is on by default, after mitmweb's own columns
        options: dict[str, Any] = gw.web("/options").json()
        assert options["web_columns"]["value"][-1] == "comment"
        assert options["web_columns"]["value"][:-1] == options["web_columns"]["default"]

        def comments() -> dict[str, str]:
            return {f["request"]["path"]: f["comment"] for f in gw.web("/flows").json()
                    if f["type"] == "http" and f["request"]["method"] != "CONNECT"}

        assert wait_until(lambda: len(comments()) == 3, 5), comments()
        seen = comments()
        assert seen["/allowed"] == "research-bot / tester / s-123"
        assert seen["/x/delete"].startswith("research-bot / tester / s-123 \u00b7 denied by "
                                            "rules.authorization[0]: ")
        assert seen["/other"] == "other-bot / other / -"

        # one agent's flows, with mitmweb's own filter language on the server
        dump = gw.web('/flows/dump?filter=~comment "^research-bot /"')
        assert dump.status_code == 200
        flows = [f for f in io.FlowReader(BytesIO(dump.content)).stream()
                 if isinstance(f, http.HTTPFlow)]
        paths = {f.request.path for f in flows}
        assert {"/allowed", "/x/delete"} <= paths and "/other" not in paths
        assert all(f.comment.startswith("research-bot / ") for f in flows)
    finally:
        gw.stop()
