"""Request normalisation: rules must see what the upstream understands, not the agent's
spelling of it."""

from __future__ import annotations

import pytest

from fleetgate.normalize import RequestFacts, normalize_host, normalize_path, request_facts


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/v1/messages", "/v1/messages"),
        ("/", "/"),
        ("", "/"),
        # percent-encoding of ordinary letters
        ("/%64elete", "/delete"),
        ("/v1/%64%65%6c%65%74%65", "/v1/delete"),
        ("/%44ELETE", "/DELETE"),
        # double (and triple) encoding decodes until stable
        ("/%2564elete", "/delete"),
        ("/%252564elete", "/delete"),
        # dot segments, plain and encoded
        ("/a/../delete", "/delete"),
        ("/a/./b", "/a/b"),
        ("/a/%2e%2e/delete", "/delete"),
        ("/a/%2E/b", "/a/b"),
        ("/%252e%252e/x", "/x"),
        # '..' never climbs above the root
        ("/../../etc/passwd", "/etc/passwd"),
        # encoded separators are data inside a segment (servers decode them per segment):
        # they stay encoded, canonical upper case, and never create or remove a level
        ("/..%2f..%2fadmin", "/..%2F..%2Fadmin"),
        ("/..%2F..%2Fadmin", "/..%2F..%2Fadmin"),
        ("/idx/_doc/x%2F..%2F..%2F_search", "/idx/_doc/x%2F..%2F..%2F_search"),
        ("/a/%252F/b", "/a/%2F/b"),
        # repeated slashes and backslashes
        ("//delete", "/delete"),
        ("/a//b///c", "/a/b/c"),
        ("\\delete", "/delete"),
        ("/a\\..\\delete", "/delete"),
        ("/a%5c..%5cdelete", "/a%5C..%5Cdelete"),
        # a relative target still becomes absolute
        ("%64elete", "/delete"),
        ("delete", "/delete"),
        # a trailing slash is kept (it can be meaningful), but not doubled
        ("/a/b/", "/a/b/"),
        ("/a/b//", "/a/b/"),
        ("/a/b/.", "/a/b"),
    ],
)
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["/%64elete", "/%2564elete", "/a/../delete", "//delete", "\\delete", "/x/%2e%2e/delete",
     "/./delete", "/delete/."],
)
def test_evasions_of_delete_all_become_delete(raw: str) -> None:
    path = normalize_path(raw)
    assert path in ("/delete", "/delete/")
    assert "delete" in path


def test_normalize_path_is_idempotent() -> None:
    for raw in ["/%2564elete", "/a/../b/./c//d", "\\x\\y", "/..%2f..%2fadmin", "/a/b/"]:
        once = normalize_path(raw)
        assert normalize_path(once) == once


def test_normalize_path_does_not_raise_on_invalid_utf8_or_bad_escapes() -> None:
    assert normalize_path("/%ff") == "/\ufffd"
    assert normalize_path("/100%") == "/100%"
    assert normalize_path("/%zz") == "/%zz"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("api.openai.com", "api.openai.com"),
        ("API.OpenAI.com", "api.openai.com"),
        ("API.OpenAI.com.", "api.openai.com"),
        ("api.openai.com..", "api.openai.com"),
        ("  Example.COM ", "example.com"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("[0:0:0:0:0:0:0:1]", "::1"),
        ("[FE80::1]", "fe80::1"),
        ("10.0.0.1", "10.0.0.1"),
        ("169.254.169.254.", "169.254.169.254"),
    ],
)
def test_normalize_host(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


def test_normalize_host_ipv4_mapped_ipv6_is_canonical() -> None:
    a = normalize_host("[::FFFF:169.254.169.254]")
    b = normalize_host("::ffff:a9fe:a9fe")
    assert a == b
    assert a.startswith("::ffff:")


def test_request_facts_normalises_everything() -> None:
    facts = request_facts(
        "get", "HTTPS", "API.OpenAI.com.", 443, "/v1/%64elete?x=1",
        [("Content-Type", "application/json")],
    )
    assert isinstance(facts, RequestFacts)
    assert facts.method == "GET"
    assert facts.scheme == "https"
    assert facts.host == "api.openai.com"
    assert facts.port == 443
    assert facts.path == "/v1/delete"
    assert facts.raw_path == "/v1/%64elete"
    assert facts.query == {"x": "1"}
    assert facts.headers == {"content-type": "application/json"}


def test_request_facts_ipv6_host() -> None:
    facts = request_facts("GET", "http", "[::1]", 8080, "/", [])
    assert facts.host == "::1"
    assert facts.port == 8080


def test_request_facts_port_is_int() -> None:
    facts = request_facts("GET", "https", "h", "8443", "/", [])  # type: ignore[arg-type]
    assert facts.port == 8443
    assert isinstance(facts.port, int)


def test_query_is_split_from_the_path_and_decoded() -> None:
    facts = request_facts("GET", "https", "h", 443, "/search?q=a%20b&lang=en&plus=a+b", [])
    assert facts.path == "/search"
    assert facts.raw_path == "/search"
    assert facts.query == {"q": "a b", "lang": "en", "plus": "a b"}


def test_query_repeated_params_keep_every_value() -> None:
    facts = request_facts("GET", "https", "h", 443, "/?a=1&b=x&a=2&a=3", [])
    assert facts.query == {"a": "1,2,3", "b": "x"}


def test_query_blank_values_are_kept() -> None:
    facts = request_facts("GET", "https", "h", 443, "/?flag=&other", [])
    assert facts.query == {"flag": "", "other": ""}


def test_query_string_does_not_leak_into_path() -> None:
    facts = request_facts("GET", "https", "h", 443, "/safe?next=/delete", [])
    assert facts.path == "/safe"
    assert "delete" not in facts.path
    assert facts.query == {"next": "/delete"}


def test_empty_target_and_query_only_target() -> None:
    assert request_facts("GET", "https", "h", 443, "", []).path == "/"
    facts = request_facts("GET", "https", "h", 443, "?q=1", [])
    assert facts.path == "/"
    assert facts.raw_path == "/"
    assert facts.query == {"q": "1"}


def test_headers_are_lower_cased_and_repeated_headers_joined() -> None:
    facts = request_facts(
        "GET", "https", "h", 443, "/",
        [("X-Tenant", "a"), ("x-tenant", "b"), ("X-TENANT", "c"), ("Accept", "*/*")],
    )
    assert facts.headers == {"x-tenant": "a, b, c", "accept": "*/*"}


def test_header_values_are_not_altered() -> None:
    facts = request_facts("GET", "https", "h", 443, "/", [("X-Mixed", "  MiXeD Case ")])
    assert facts.headers["x-mixed"] == "  MiXeD Case "


def test_to_cel_exposes_every_field_as_plain_data() -> None:
    facts = request_facts("post", "https", "H.example.", 443, "/a/../b?k=v&k=w",
                          [("X-A", "1"), ("x-a", "2")])
    cel = facts.to_cel()
    assert cel == {
        "method": "POST",
        "scheme": "https",
        "host": "h.example",
        "port": 443,
        "path": "/b",
        "raw_path": "/a/../b",
        "query": {"k": "v,w"},
        "headers": {"x-a": "1, 2"},
    }
    # a copy: rules (or callers) cannot mutate the frozen facts through it
    cel["query"]["k"] = "changed"
    cel["headers"]["x-a"] = "changed"
    assert facts.query == {"k": "v,w"}
    assert facts.headers == {"x-a": "1, 2"}
