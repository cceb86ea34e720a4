"""Reports of a ``fleetgate rules test`` run: for people, TAP, JUnit XML.

People read failures as ``file:line: case name: expected X got Y (rule ...)`` (editors and CI
annotate the line), then a count. TAP (version 13) and JUnit XML are what CI systems
already parse: one test per case, named ``file: case name``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence

from fleetgate.offline.cases import CaseResult

__all__ = ["human", "junit", "summary", "tap"]


def _title(r: CaseResult) -> str:
    return f"{r.case.file.name}: {r.case.name}"


def summary(results: Sequence[CaseResult]) -> str:
    failed = sum(1 for r in results if not r.ok)
    files = len({r.case.file for r in results})
    if failed:
        return f"{failed} of {len(results)} case(s) failed in {files} file(s)"
    return f"ok: {len(results)} case(s) passed in {files} file(s)"


def human(results: Sequence[CaseResult], verbose: bool = False) -> str:
    lines = []
    for r in results:
        if not r.ok:
            lines.append(r.message())
        elif verbose:
            lines.append(f"{r.case.file}:{r.case.line}: {r.case.name}: ok")
    lines.append(summary(results))
    return "\n".join(lines)


def tap(results: Sequence[CaseResult]) -> str:
    lines = ["TAP version 13", f"1..{len(results)}"]
    for i, r in enumerate(results, start=1):
        title = _title(r).replace("#", "\\#")
        lines.append(f"{'ok' if r.ok else 'not ok'} {i} - {title}")
        if not r.ok:
            lines.append("  ---")
            lines.append(f"  at: {r.case.where}")
            lines.append("  message: |")
            lines.extend(f"    {p}" for p in r.problems)
            lines.append("  ...")
    return "\n".join(lines)


def junit(results: Sequence[CaseResult]) -> bytes:
    """One ``<testsuite>`` per file, one ``<testcase>`` per case; a ``<failure>`` (the policy
    decided otherwise) or ``<error>`` (the case itself is broken) with ``file:line``."""
    root = ET.Element("testsuites", name="fleetgate rules test", tests=str(len(results)),
                      failures=str(sum(1 for r in results if not r.ok and not r.error)),
                      errors=str(sum(1 for r in results if r.error)))
    by_file: dict[str, list[CaseResult]] = {}
    for r in results:
        by_file.setdefault(str(r.case.file), []).append(r)
    for path, rs in by_file.items():
        suite = ET.SubElement(root, "testsuite", name=path, tests=str(len(rs)),
                              failures=str(sum(1 for r in rs if not r.ok and not r.error)),
                              errors=str(sum(1 for r in rs if r.error)))
        for r in rs:
            tc = ET.SubElement(suite, "testcase", classname=path, name=r.case.name,
                               file=str(r.case.file), line=str(r.case.expect_line))
            if not r.ok:
                el = ET.SubElement(tc, "error" if r.error else "failure",
                                   message=r.problems[0] if r.problems else "failed")
                el.text = r.message()
    ET.indent(root)
    out: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return out
