"""Upstream credentials: parsing the routes, matching requests, reading the secrets."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

import fleetgate.stores.secrets as secrets_module
from fleetgate.netaddr import HostPattern
from fleetgate.policy.credentials import (
    CredentialRoute,
    CredentialUnavailable,
    Secret,
    find_route,
    redacted,
)
from fleetgate.policy.loader import PolicyError, load_policy
from fleetgate.policy.parse_credentials import parse_credentials
from fleetgate.policy.report import Reporter
from fleetgate.stores.secrets import SecretSource

SECRET = "sk-live-0123456789abcdef"


class Errors:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def __call__(self, key_path: str, message: str) -> None:
        self.items.append((key_path, message))

    def paths(self) -> list[str]:
        return [p for p, _ in self.items]


def parse(section: Any, owner: str = "fleet", taken: set[str] | None = None,
          ) -> tuple[list[CredentialRoute], Errors]:
    errors = Errors()
    report = Reporter("rules.yaml")
    routes = parse_credentials(section, "credentials", report, owner=owner, taken=taken)
    for problem in report.problems:
        errors(problem.path, problem.message)
    return routes, errors


def route(**kw: Any) -> CredentialRoute:
    entry: dict[str, Any] = {"hosts": ["api.openai.com"], "secretFile": "/run/key", **kw}
    routes, errors = parse([entry])
    assert not errors.items, errors.items
    return routes[0]


# -- parsing ------------------------------------------------------------------------------


def test_parses_every_key() -> None:
    routes, errors = parse([{
        "id": "openai", "hosts": ["API.OpenAI.com.", "*.openai.azure.com"], "ports": [443, 8443],
        "pathPrefix": "/v1/", "header": "X-Api-Key", "value": "Key {secret}",
        "secretFile": "/var/run/fleetgate/openai-key", "remove": ["Authorization", "x-goog-api-key",
                                                                  "AUTHORIZATION"],
    }])
    assert not errors.items
    (r,) = routes
    assert r.id == "openai"
    assert [h.host for h in r.hosts] == ["api.openai.com", "*.openai.azure.com"]
    assert r.ports == (443, 8443) and r.path_prefix == "/v1/"
    assert r.header == "X-Api-Key" and r.template == "Key {secret}"
    assert r.secret_file == "/var/run/fleetgate/openai-key" and r.secret_env is None
    assert r.remove == ("authorization", "x-goog-api-key")
    assert r.stripped == ("x-api-key", "authorization", "x-goog-api-key")


def test_defaults_and_default_ids() -> None:
    routes, errors = parse([{"hosts": ["a.example.com"], "secretEnv": "A_KEY"},
                            {"hosts": ["b.example.com"], "secretEnv": "B_KEY"}], owner="llm")
    assert not errors.items
    a, b = routes
    assert (a.id, b.id) == ("llm.credentials[0]", "llm.credentials[1]")
    assert a.header == "Authorization" and a.template == "Bearer {secret}"
    assert a.ports == () and a.path_prefix == "" and a.remove == ()
    assert a.secret_env == "A_KEY" and a.secret_file is None
    assert a.stripped == ("authorization",)


@pytest.mark.parametrize(("entry", "path", "message"), [
    ("not a mapping", "credentials[0]", "a credential route is a mapping"),
    ({"hosts": ["a.com"], "secretEnv": "K", "secretfile": "/k"}, "credentials[0].secretfile",
     "unknown key 'secretfile'"),
    ({"id": "", "hosts": ["a.com"], "secretEnv": "K"}, "credentials[0].id", "non-empty"),
    ({"id": "two words", "hosts": ["a.com"], "secretEnv": "K"}, "credentials[0].id",
     "without spaces"),
    ({"id": 7, "hosts": ["a.com"], "secretEnv": "K"}, "credentials[0].id", "non-empty string"),
    ({"secretEnv": "K"}, "credentials[0].hosts", "non-empty list"),
    ({"hosts": [], "secretEnv": "K"}, "credentials[0].hosts", "non-empty list"),
    ({"hosts": "a.com", "secretEnv": "K"}, "credentials[0].hosts", "non-empty list"),
    ({"hosts": [""], "secretEnv": "K"}, "credentials[0].hosts[0]", "non-empty string"),
    ({"hosts": [443], "secretEnv": "K"}, "credentials[0].hosts[0]", "non-empty string"),
    ({"hosts": ["*"], "secretEnv": "K"}, "credentials[0].hosts[0]", "every host"),
    ({"hosts": ["a.com:443"], "secretEnv": "K"}, "credentials[0].hosts[0]", "under 'ports'"),
    ({"hosts": ["a*.example.com"], "secretEnv": "K"}, "credentials[0].hosts[0]",
     "leading '*.'"),
    ({"hosts": ["a.com"], "ports": [], "secretEnv": "K"}, "credentials[0].ports", "non-empty"),
    ({"hosts": ["a.com"], "ports": 443, "secretEnv": "K"}, "credentials[0].ports", "list"),
    ({"hosts": ["a.com"], "ports": [443, 0], "secretEnv": "K"}, "credentials[0].ports[1]",
     "1 to 65535"),
    ({"hosts": ["a.com"], "ports": [65536], "secretEnv": "K"}, "credentials[0].ports[0]",
     "1 to 65535"),
    ({"hosts": ["a.com"], "ports": [True], "secretEnv": "K"}, "credentials[0].ports[0]",
     "1 to 65535"),
    ({"hosts": ["a.com"], "ports": ["443"], "secretEnv": "K"}, "credentials[0].ports[0]",
     "1 to 65535"),
    ({"hosts": ["a.com"], "pathPrefix": "v1/", "secretEnv": "K"}, "credentials[0].pathPrefix",
     "starting with '/'"),
    ({"hosts": ["a.com"], "pathPrefix": 1, "secretEnv": "K"}, "credentials[0].pathPrefix",
     "starting with '/'"),
    ({"hosts": ["a.com"], "pathPrefix": "/v1/../admin", "secretEnv": "K"},
     "credentials[0].pathPrefix", "normalised path"),
    ({"hosts": ["a.com"], "pathPrefix": "/v1//chat", "secretEnv": "K"},
     "credentials[0].pathPrefix", "normalised path"),
    ({"hosts": ["a.com"], "pathPrefix": "/%761/", "secretEnv": "K"},
     "credentials[0].pathPrefix", "percent-escapes"),
    ({"hosts": ["a.com"], "header": "Bad Header", "secretEnv": "K"}, "credentials[0].header",
     "HTTP header name"),
    ({"hosts": ["a.com"], "header": "", "secretEnv": "K"}, "credentials[0].header",
     "HTTP header name"),
    ({"hosts": ["a.com"], "header": 5, "secretEnv": "K"}, "credentials[0].header",
     "HTTP header name"),
    ({"hosts": ["a.com"], "header": "Host", "secretEnv": "K"}, "credentials[0].header",
     "frames or routes"),
    ({"hosts": ["a.com"], "header": "Content-Length", "secretEnv": "K"},
     "credentials[0].header", "frames or routes"),
    ({"hosts": ["a.com"], "value": "Bearer", "secretEnv": "K"}, "credentials[0].value",
     "exactly once"),
    ({"hosts": ["a.com"], "value": "{secret}{secret}", "secretEnv": "K"}, "credentials[0].value",
     "exactly once"),
    ({"hosts": ["a.com"], "value": 12, "secretEnv": "K"}, "credentials[0].value",
     "exactly once"),
    ({"hosts": ["a.com"], "value": "Bearer {secret}\r\nX-Evil: 1", "secretEnv": "K"},
     "credentials[0].value", "one line"),
    ({"hosts": ["a.com"]}, "credentials[0]", "needs secretFile"),
    ({"hosts": ["a.com"], "secretFile": "/k", "secretEnv": "K"}, "credentials[0].secretEnv",
     "not both"),
    ({"hosts": ["a.com"], "secretFile": "keys/openai"}, "credentials[0].secretFile",
     "absolute path"),
    ({"hosts": ["a.com"], "secretFile": ["/k"]}, "credentials[0].secretFile", "absolute path"),
    ({"hosts": ["a.com"], "secretEnv": "1KEY"}, "credentials[0].secretEnv",
     "environment variable name"),
    ({"hosts": ["a.com"], "secretEnv": "OPENAI-KEY"}, "credentials[0].secretEnv",
     "environment variable name"),
    ({"hosts": ["a.com"], "secretEnv": "K", "remove": "x-api-key"}, "credentials[0].remove",
     "list of header names"),
    ({"hosts": ["a.com"], "secretEnv": "K", "remove": ["x-api-key", "x api key"]},
     "credentials[0].remove[1]", "HTTP header name"),
    ({"hosts": ["a.com"], "secretEnv": "K", "remove": ["Transfer-Encoding"]},
     "credentials[0].remove[0]", "frames or routes"),
])
def test_every_error_names_its_key_path(entry: Any, path: str, message: str) -> None:
    routes, errors = parse([entry])
    assert routes == []
    assert len(errors.items) == 1, errors.items
    assert errors.items[0][0] == path
    assert message in errors.items[0][1]


def test_section_must_be_a_list() -> None:
    routes, errors = parse({"hosts": ["a.com"], "secretEnv": "K"})
    assert routes == [] and errors.paths() == ["credentials"]


def test_every_problem_of_a_route_is_reported_and_good_routes_kept() -> None:
    routes, errors = parse([
        {"id": "ok", "hosts": ["a.com"], "secretEnv": "K"},
        {"hosts": ["*"], "ports": [0], "header": "Host", "value": "x", "secretFile": "rel",
         "bogus": 1},
    ])
    assert [r.id for r in routes] == ["ok"]
    assert sorted(errors.paths()) == sorted([
        "credentials[1].bogus", "credentials[1].hosts[0]", "credentials[1].ports[0]",
        "credentials[1].header", "credentials[1].value", "credentials[1].secretFile"])


def test_duplicate_ids_in_a_file_and_across_files() -> None:
    taken: set[str] = set()
    _, errors = parse([{"id": "openai", "hosts": ["a.com"], "secretEnv": "K"},
                       {"id": "openai", "hosts": ["b.com"], "secretEnv": "K"}], taken=taken)
    assert errors.paths() == ["credentials[1].id"]
    assert "duplicate credentials id 'openai'" in errors.items[0][1]
    assert taken == {"openai"}
    routes, errors = parse([{"id": "openai", "hosts": ["c.com"], "secretEnv": "K"}], taken=taken)
    assert routes == [] and errors.paths() == ["credentials[0].id"]


HEAD = "apiVersion: fleetgate/v1\n"


def test_loader_builds_routes_from_every_file_in_order(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(HEAD + textwrap.dedent("""\
        credentials:
        - id: openai
          hosts: [api.openai.com]
          secretFile: /var/run/fleetgate/openai-key
        - hosts: [api.anthropic.com]
          header: x-api-key
          value: "{secret}"
          secretEnv: ANTHROPIC_API_KEY
          remove: [authorization]
        """))
    (tmp_path / "b.yaml").write_text(HEAD + "revoked: {agents: [x]}\n---\n" + HEAD + textwrap.dedent("""\
        credentials:
        - id: es
          hosts: [es.internal]
          ports: [9200]
          pathPrefix: /logs-
          value: "ApiKey {secret}"
          secretFile: /var/run/fleetgate/es-key
        """))
    policy = load_policy(tmp_path)
    assert [r.id for r in policy.credentials] == ["openai", "a.credentials[1]", "es"]
    assert policy.credentials[1].header == "x-api-key"
    assert policy.credentials[2].ports == (9200,)


def test_loader_locates_errors_by_file_line_and_key_path(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(HEAD + textwrap.dedent("""\
        credentials:
        - id: openai
          hosts: [api.openai.com]
          secretFile: relative/key
        """))
    (tmp_path / "b.yaml").write_text(HEAD + textwrap.dedent("""\
        credentials:
        - id: openai
          hosts: [api.openai.com]
          secretEnv: OPENAI_API_KEY
        """))
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)
    lines = [str(p) for p in info.value.problems]
    assert lines == [
        f"{tmp_path / 'a.yaml'}:5 at credentials[0].secretFile: secretFile must be an absolute "
        "path (relative paths would depend on the gateway's working directory)",
        f"{tmp_path / 'b.yaml'}:3 at credentials[0].id: duplicate credentials id 'openai' "
        "(ids must be unique across all rules files)",
    ]


def test_loader_without_credentials_has_none(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(HEAD + "revoked: {agents: [x]}\n")
    assert load_policy(tmp_path).credentials == ()


# -- matching -----------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "ok"), [
    ("api.openai.com", True),
    ("API.OpenAI.COM", True),
    ("api.openai.com.", True),
    ("api.openai.com.evil.com", False),
    ("evilapi.openai.com", False),
    ("openai.com", False),
    ("x.api.openai.com", False),
])
def test_exact_host(host: str, ok: bool) -> None:
    assert route().matches(host, 443, "/v1/chat/completions") is ok


@pytest.mark.parametrize(("host", "ok"), [
    ("a.example.com", True),
    ("a.b.example.com", True),
    ("A.EXAMPLE.COM.", True),
    ("example.com", False),  # the apex is not a subdomain
    ("evilexample.com", False),
    ("example.com.evil.net", False),
    ("a.example.com.evil.net", False),
])
def test_wildcard_host_is_subdomains_only(host: str, ok: bool) -> None:
    assert route(hosts=["*.example.com"]).matches(host, 443, "/") is ok


def test_ip_hosts_match_in_any_spelling() -> None:
    r = route(hosts=["127.0.0.1"])
    assert r.matches("127.0.0.1", 8443, "/") and r.matches("127.1", 8443, "/")
    assert r.matches("0x7f.0.0.1", 8443, "/")
    assert not r.matches("127.0.0.2", 8443, "/")


def test_ports() -> None:
    assert route().matches("api.openai.com", 8443, "/")  # no ports: any
    r = route(ports=[443])
    assert r.matches("api.openai.com", 443, "/") and not r.matches("api.openai.com", 8443, "/")


@pytest.mark.parametrize(("path", "ok"), [
    ("/v1", True),
    ("/v1/", True),
    ("/v1/chat/completions", True),
    ("/v1/chat/completions?stream=true", True),
    ("//v1//chat", True),
    ("/v1/./chat", True),
    ("/%76%31/chat", True),  # what the upstream serves is /v1/chat
    ("/v1x/chat", False),
    ("/v2/chat", False),
    ("/", False),
    ("/V1/chat", False),  # case is kept, as the rules see it
    ("/v1/../admin", False),  # the upstream serves /admin: not under /v1/
    ("/v1/%2e%2e/admin", False),
    ("/v1/%252e%252e/admin", False),
    ("/v1\\..\\admin", False),
    ("/admin?next=/v1/", False),
])
def test_path_prefix_is_matched_on_the_normalised_path(path: str, ok: bool) -> None:
    assert route(pathPrefix="/v1/").matches("api.openai.com", 443, path) is ok
    assert route(pathPrefix="/v1").matches("api.openai.com", 443, path) is ok


def test_no_path_prefix_matches_every_path() -> None:
    assert route().matches("api.openai.com", 443, "/anything/../at/all?x=1")
    assert route(pathPrefix="/").matches("api.openai.com", 443, "/x")


def test_first_matching_route_wins_in_file_order() -> None:
    routes, errors = parse([
        {"id": "narrow", "hosts": ["api.example.com"], "pathPrefix": "/admin", "secretEnv": "A"},
        {"id": "wide", "hosts": ["*.example.com"], "secretEnv": "B"},
        {"id": "never", "hosts": ["api.example.com"], "secretEnv": "C"},
    ])
    assert not errors.items
    assert find_route(routes, "api.example.com", 443, "/admin/x").id == "narrow"  # type: ignore[union-attr]
    assert find_route(routes, "API.example.com.", 443, "/v1").id == "wide"  # type: ignore[union-attr]
    assert find_route(routes, "api.example.com", 443, "/admin/../v1").id == "wide"  # type: ignore[union-attr]
    assert find_route(routes, "example.com", 443, "/") is None
    assert find_route([], "api.example.com", 443, "/") is None


def test_render_fills_the_one_slot_literally() -> None:
    assert route().render(Secret(SECRET)) == f"Bearer {SECRET}"
    assert route(value="{secret}").render(Secret(SECRET)) == SECRET
    # other braces are text, not a format string
    assert route(value="{x} {secret} {}").render(Secret("k{0}")) == "{x} k{0} {}"
    assert redacted("openai") == "[injected by fleetgate: openai]"


# -- secrets ------------------------------------------------------------------------------


def file_route(path: Path, rid: str = "openai") -> CredentialRoute:
    return route(id=rid, secretFile=str(path))


def rotate(path: Path, text: str) -> None:
    """What an operator's tooling does: write a new file, rename it over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_file_secret_is_stripped(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(f"\n  {SECRET}  \n")
    assert SecretSource().read(file_route(key)).reveal() == SECRET


def test_file_rotation_by_rename_is_picked_up(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("old-key\n")
    source, r = SecretSource(), file_route(key)
    assert source.read(r).reveal() == "old-key"
    rotate(key, "new-key\n")  # same size: the inode tells
    assert source.read(r).reveal() == "new-key"


def test_file_rewritten_in_place_with_same_size_is_picked_up(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("aaaa")
    st = key.stat()
    source, r = SecretSource(), file_route(key)
    assert source.read(r).reveal() == "aaaa"
    key.write_text("bbbb")
    os.utime(key, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert key.stat().st_ino == st.st_ino and key.stat().st_size == st.st_size
    assert source.read(r).reveal() == "bbbb"


def test_kubernetes_secret_symlink_swap_is_picked_up(tmp_path: Path) -> None:
    """A Secret volume: key -> ..data/key, ..data -> ..2024_x; an update swaps ..data."""
    mount = tmp_path / "mount"
    mount.mkdir()
    first, second = mount / "..2024_01", mount / "..2024_02"
    for d, text in ((first, "key-one"), (second, "key-two")):
        d.mkdir()
        (d / "openai-key").write_text(text)
    st = (first / "openai-key").stat()
    os.utime(second / "openai-key", ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime
    (mount / "..data").symlink_to(first.name)
    (mount / "openai-key").symlink_to("..data/openai-key")
    source, r = SecretSource(), file_route(mount / "openai-key")
    assert source.read(r).reveal() == "key-one"
    tmp_link = mount / "..data_tmp"
    tmp_link.symlink_to(second.name)
    os.replace(tmp_link, mount / "..data")
    assert source.read(r).reveal() == "key-two"


def test_unchanged_file_is_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "key"
    key.write_text(SECRET)
    opened: list[str] = []
    real_open = open

    def counting_open(path: Any, *a: Any, **kw: Any) -> Any:
        opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(secrets_module, "open", counting_open, raising=False)
    source, r = SecretSource(), file_route(key)
    for _ in range(5):
        assert source.read(r).reveal() == SECRET
    assert opened == [str(key)]
    rotate(key, "rotated")
    assert source.read(r).reveal() == "rotated"
    assert opened == [str(key), str(key)]


def unavailable(source: SecretSource, r: CredentialRoute) -> CredentialUnavailable:
    with pytest.raises(CredentialUnavailable) as info:
        source.read(r)
    assert info.value.route_id == r.id
    assert info.value.why in str(info.value)
    return info.value


def test_missing_file_is_unavailable_and_says_what_to_fix(tmp_path: Path) -> None:
    exc = unavailable(SecretSource(), file_route(tmp_path / "nope", "gemini"))
    assert f"secret file {tmp_path / 'nope'} does not exist" in exc.why
    assert "fix secretFile" in exc.why
    assert str(exc).startswith("credentials 'gemini' unavailable: ")


def test_deleted_file_stops_working_at_once(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(SECRET)
    source, r = SecretSource(), file_route(key)
    assert source.read(r).reveal() == SECRET
    key.unlink()  # revoked: no stale copy is used
    assert "does not exist" in unavailable(source, r).why
    key.write_text("restored")
    assert source.read(r).reveal() == "restored"


@pytest.mark.parametrize(("content", "why"), [
    ("", "is empty"),
    ("  \n\t\n", "is empty"),
    (f"{SECRET}\nsecond-line", "more than one line"),
    (f"{SECRET}\x00", "control character"),
])
def test_unusable_file_content(tmp_path: Path, content: str, why: str) -> None:
    key = tmp_path / "key"
    key.write_text(content)
    exc = unavailable(SecretSource(), file_route(key))
    assert why in exc.why
    assert SECRET not in str(exc) and "second-line" not in str(exc)


def test_file_that_becomes_empty_is_unavailable(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(SECRET)
    source, r = SecretSource(), file_route(key)
    source.read(r)
    rotate(key, "")
    assert "is empty" in unavailable(source, r).why


def test_directory_huge_and_binary_files_are_unavailable(tmp_path: Path) -> None:
    assert "not a regular file" in unavailable(SecretSource(), file_route(tmp_path)).why
    big = tmp_path / "big"
    big.write_bytes(b"x" * (secrets_module.MAX_SECRET_BYTES + 1))
    assert "larger than" in unavailable(SecretSource(), file_route(big)).why
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "not UTF-8" in unavailable(SecretSource(), file_route(binary)).why


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_unavailable(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(SECRET)
    key.chmod(0)
    assert "cannot be read" in unavailable(SecretSource(), file_route(key)).why


def env_route(name: str = "OPENAI_API_KEY") -> CredentialRoute:
    routes, errors = parse([{"id": "env", "hosts": ["api.openai.com"], "secretEnv": name}])
    assert not errors.items
    return routes[0]


def test_env_secret_is_read_each_time() -> None:
    environ = {"OPENAI_API_KEY": f" {SECRET}\n"}
    source, r = SecretSource(environ), env_route()
    assert source.read(r).reveal() == SECRET
    environ["OPENAI_API_KEY"] = "rotated"
    assert source.read(r).reveal() == "rotated"
    del environ["OPENAI_API_KEY"]
    exc = unavailable(source, r)
    assert "environment variable OPENAI_API_KEY is not set" in exc.why
    environ["OPENAI_API_KEY"] = "  "
    assert "is empty" in unavailable(source, r).why


def test_env_secret_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETGATE_TEST_CRED", SECRET)
    assert SecretSource().read(env_route("FLEETGATE_TEST_CRED")).reveal() == SECRET
    monkeypatch.delenv("FLEETGATE_TEST_CRED")
    unavailable(SecretSource(), env_route("FLEETGATE_TEST_CRED"))


def test_secrets_never_show_in_repr_str_or_format(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(SECRET)
    source, r = SecretSource(), file_route(key)
    secret = source.read(r)
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", f"{secret:>40}",
                 repr(source), str(source), repr(r), repr([secret]), repr({"s": secret})):
        assert SECRET not in text, text
    assert secret.reveal() == SECRET


def test_host_patterns_are_the_egress_ones() -> None:
    assert isinstance(route().hosts[0], HostPattern)
