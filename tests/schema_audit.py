"""Every rules document the test suite loads successfully must validate against the JSON
Schema generated from the loader's model (``rules/fleetgate-rules.schema.json``).

The schema is for editors; the loader is the judge. If the loader accepts a document the
schema refuses, an editor would flag valid rules as wrong: that drift fails the test that
loaded the document, naming the document and the schema's complaint. Installed for the
whole session by ``tests/conftest.py`` (:func:`audit_loader`); e2e tests load the rules
they hand to a gateway in-process too (``tests/e2e/conftest.py``), so theirs are covered.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jsonschema

from fleetgate.policy import loader
from fleetgate.policy.schema import json_schema

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "rules" / "fleetgate-rules.schema.json"


@functools.cache
def validator() -> jsonschema.Draft202012Validator:
    """A validator of the generated schema (the committed file is checked to equal it)."""
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(doc: Any) -> list[str]:
    """What the schema says about one YAML document (empty: valid)."""
    return [f"{'.'.join(map(str, e.absolute_path)) or '<document>'}: {e.message}"
            for e in validator().iter_errors(json.loads(json.dumps(doc, default=str)))]


@contextmanager
def audit_loader() -> Iterator[None]:
    """Wrap the loader's per-document step: a document that added no problem must validate."""
    original: Callable[..., None] = loader._add_document

    def audited(parts: Any, doc: Any, file: Path) -> None:
        before = len(parts.report.problems)
        original(parts, doc, file)
        if len(parts.report.problems) == before and isinstance(doc, dict):
            errors = schema_errors(doc)
            assert not errors, (f"{file}: the loader accepts this document but "
                                f"rules/fleetgate-rules.schema.json refuses it: {errors}; fix "
                                "fleetgate.policy.schema.MODEL")

    loader._add_document = audited  # type: ignore[assignment]
    try:
        yield
    finally:
        loader._add_document = original  # type: ignore[assignment]
