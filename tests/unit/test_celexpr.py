"""The CEL wrapper: everything checkable is checked at compile time, evaluation is total."""

from __future__ import annotations

import pytest

from fleetgate.celexpr import Activation, CelError, Expr, compile_expr

ROOTS = ("jwt", "request")
DATA = {
    "jwt": {"sub": "agent-1", "agent_role": "security", "groups": ["a", "b"]},
    "request": {"method": "GET", "path": "/Index/_Search", "headers": {"x-a": "1"},
                "query": {}},
}


def ev(source: str, data: dict[str, object] | None = None) -> bool:
    return compile_expr(source, ROOTS).evaluate(DATA if data is None else data)


# -- compile time --------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["jwt.sub ==", "request.path.contains(", "(((", "a b",
                                    "jwt.sub == 'x", "request.method in [\"GET\""])
def test_syntax_errors_fail_compilation(source: str) -> None:
    with pytest.raises(CelError) as info:
        compile_expr(source, ROOTS)
    assert str(info.value)
    assert "\n" not in str(info.value)  # one compact line for the operator


def test_syntax_error_message_mentions_position() -> None:
    with pytest.raises(CelError, match=r"1:9"):
        compile_expr("jwt.a ==", ROOTS)


@pytest.mark.parametrize("source", ["", "   ", None, 42])
def test_empty_or_non_string_expression_fails(source: object) -> None:
    with pytest.raises(CelError, match="empty"):
        compile_expr(source, ROOTS)  # type: ignore[arg-type]


def test_unknown_variable_fails_and_lists_the_available_roots() -> None:
    with pytest.raises(CelError) as info:
        compile_expr('requset.path == "/"', ROOTS)
    msg = str(info.value)
    assert "unknown variable requset" in msg
    assert "jwt" in msg
    assert "request" in msg


def test_variable_allowed_in_one_context_is_refused_in_a_narrower_one() -> None:
    compile_expr('request.method == "GET"', ROOTS)
    with pytest.raises(CelError, match="unknown variable request"):
        compile_expr('request.method == "GET"', ("jwt",))


@pytest.mark.parametrize("source", ['request.path.frobnicate()', 'frob(jwt.sub)',
                                    'request.path.lowercase() == "x"'])
def test_unknown_function_fails_at_compile_time(source: str) -> None:
    with pytest.raises(CelError, match="unknown function"):
        compile_expr(source, ROOTS)


def test_compiled_expression_records_source_and_variables() -> None:
    e = compile_expr('jwt.agent_role == "security" && request.method == "GET"', ROOTS)
    assert isinstance(e, Expr)
    assert e.source == 'jwt.agent_role == "security" && request.method == "GET"'
    assert e.variables == frozenset({"jwt", "request"})


def test_macro_bound_variables_are_not_unknown_roots() -> None:
    assert ev("[1, 2].all(x, x > 0)") is True
    assert ev("[1, -2].all(x, x > 0)") is False
    assert ev("[1, 2].exists(y, y == 2)") is True
    assert ev("[1, 2].exists_one(w, w == 1)") is True
    assert ev("[1, 2].map(z, z * 2) == [2, 4]") is True
    assert ev("[1, 2, 3].filter(q, q > 1).size() == 2") is True
    assert ev('jwt.groups.exists(g, g == "b")') is True
    assert ev('request.path.split("/").exists(s, s.startsWith("_"))') is True


def test_macro_does_not_whitelist_other_unknown_names() -> None:
    with pytest.raises(CelError, match="unknown variable other"):
        compile_expr("[1].all(x, x > 0) && other", ROOTS)


# -- evaluation ----------------------------------------------------------------------------


def test_simple_true_and_false() -> None:
    assert ev('jwt.agent_role == "security"') is True
    assert ev('jwt.agent_role == "cloud"') is False


def test_stdlib_string_functions() -> None:
    assert ev('request.path.lowerAscii() == "/index/_search"') is True
    assert ev('request.path.upperAscii() == "/INDEX/_SEARCH"') is True
    assert ev('request.path.split("/") == ["", "Index", "_Search"]') is True
    assert ev('request.path.split("/").size() == 3') is True
    assert ev('request.path.replace("Index", "x") == "/x/_Search"') is True
    assert ev('["a", "b"].join("-") == "a-b"') is True


def test_native_string_functions() -> None:
    assert ev('request.path.contains("_Search")') is True
    assert ev('request.path.contains("_search")') is False  # case-sensitive
    assert ev('request.path.startsWith("/Index") && request.path.endsWith("_Search")') is True
    assert ev('request.path.matches("^/[A-Z]")') is True
    assert ev("size(request.path) == 14") is True
    assert ev('request.method in ["GET", "HEAD"]') is True


def test_has_on_present_and_missing_fields() -> None:
    assert ev("has(jwt.sub)") is True
    assert ev("has(jwt.nope)") is False


def test_missing_field_is_an_error_not_false() -> None:
    e = compile_expr('jwt.tenant == "acme"', ROOTS)
    with pytest.raises(CelError, match="no such field"):
        e.evaluate(DATA)


def test_missing_map_key_is_an_error() -> None:
    with pytest.raises(CelError):
        ev('request.headers["x-missing"] == "1"')


def test_negated_missing_field_is_still_an_error() -> None:
    # `!(x == y)` must not turn an error into true or false
    with pytest.raises(CelError):
        ev('!(jwt.tenant == "acme")')


def test_short_circuit_can_absorb_an_error() -> None:
    assert ev('false && jwt.tenant == "x"') is False
    assert ev('true || jwt.tenant == "x"') is True


@pytest.mark.parametrize("source", ['"a string"', "1", "jwt.sub", "[true]", "{'a': true}"])
def test_non_bool_result_is_an_error(source: str) -> None:
    with pytest.raises(CelError, match="not bool"):
        ev(source)


@pytest.mark.parametrize("source", ["1 / 0 == 1", 'int("x") == 1'])
def test_runtime_failures_become_cel_errors(source: str) -> None:
    with pytest.raises(CelError) as info:
        ev(source)
    assert str(info.value)
    assert "\n" not in str(info.value)


def test_type_mismatch_is_a_cel_error_not_an_engine_exception() -> None:
    data = {"jwt": {"n": "3"}, "request": {}}
    with pytest.raises(CelError):
        ev("jwt.n > 2", data)


def test_activation_is_reusable_across_expressions() -> None:
    act = Activation(DATA)
    a = compile_expr('jwt.agent_role == "security"', ROOTS)
    b = compile_expr('request.method == "POST"', ROOTS)
    assert a.evaluate(act) is True
    assert b.evaluate(act) is False
    assert a.evaluate(act) is True
    assert act.data["jwt"]["sub"] == "agent-1"


def test_activation_and_plain_mapping_agree() -> None:
    e = compile_expr('jwt.groups.exists(g, g == "a") && request.headers["x-a"] == "1"', ROOTS)
    assert e.evaluate(DATA) is True
    assert e.evaluate(Activation(DATA)) is True


def test_expressions_compare_by_source() -> None:
    a = compile_expr("true", ROOTS)
    b = compile_expr("true", ROOTS)
    assert a == b
    assert a != compile_expr("false", ROOTS)
