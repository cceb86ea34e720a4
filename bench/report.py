"""Turn the results into the markdown table (and judge the issue's targets, which are reported,
never asserted)."""

from __future__ import annotations

import copy
import math
from typing import Any

# The targets.
CPU_OVERHEAD_MAX = 1.15  # full chain adds at most 15% to bare mitmdump's per-request cost
TTFE_SLACK_MS = 5.0  # time to first streamed event within 5 ms of bare mitmdump
DOWNLOAD_BUFFER_MAX_MIB = 10.0  # proxy RSS growth during the 50 MB download (body: 47.7 MiB)
SOAK_FLAT_MAX_MIB = 5.0  # RSS growth, last minute vs first minute of the soak
RSS_NO_ESTIMATE_MAX = 1.3  # fleetgate/bare RSS when no rule, limit or budget needs an estimate
X = "\u00d7"  # multiplication sign
MINUS = "\u2212"


def _num(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float | int):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{nd}f}"
    return str(v)


def _yes(v: Any) -> str:
    return "—" if v is None else ("yes" if v else "no")


def _ratio(a: Any, b: Any) -> str:
    try:
        if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
            return "—"
        return f"{a / b:.2f}{X}"
    except TypeError:
        return "—"


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _met(ok: bool | None, detail: str) -> str:
    if ok is None:
        return f"n/a {detail}".strip()
    return f"{'met' if ok else '**not met**'} ({detail})"


class Table:
    def __init__(self) -> None:
        self.rows: list[str] = [
            "| scenario | metric | fleetgate | bare mitmdump | direct | fleetgate/bare | bare/direct "
            "| target |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]

    def row(self, scenario: str, metric: str, fg: Any, bare: Any, direct: Any = None,
            target: str = "", nd: int = 1, ratios: bool = True) -> None:
        self.rows.append(
            f"| {scenario} | {metric} | {_num(fg, nd)} | {_num(bare, nd)} | {_num(direct, nd)} | "
            f"{_ratio(fg, bare) if ratios else '—'} | {_ratio(bare, direct) if ratios else '—'} | {target} |")


def judge(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets: met / not met / n/a, with the numbers they were judged on."""
    s = results.get("scenarios", {})
    out: dict[str, Any] = {}
    a16 = _get(s, "a", "concurrency", "16")
    if a16:
        fg, bare = _get(a16, "fleetgate", "proxy_cpu_ms_per_req"), _get(a16, "bare", "proxy_cpu_ms_per_req")
        ratio = fg / bare if fg and bare else None
        out["cpu_overhead"] = {"target": f"fleetgate/bare proxy CPU per request <= {CPU_OVERHEAD_MAX}",
                               "value": round(ratio, 3) if ratio else None,
                               "met": ratio <= CPU_OVERHEAD_MAX if ratio else None}
    b = _get(s, "b", "targets")
    if b:
        fg, bare = _get(b, "fleetgate", "ttfe_p50_ms"), _get(b, "bare-sse", "ttfe_p50_ms")
        diff = fg - bare if fg is not None and bare is not None else None
        out["ttfe"] = {"target": f"fleetgate TTFE p50 <= bare + {TTFE_SLACK_MS} ms",
                       "value_ms": round(diff, 2) if diff is not None else None,
                       "met": diff <= TTFE_SLACK_MS if diff is not None else None}
        fl = _get(b, "fleetgate", "ttle_p50_ms")
        out["sse_streamed"] = {"target": "fleetgate SSE not buffered: TTFE p50 < 25% of time to last event",
                               "value": round(fg / fl, 3) if fg and fl else None,
                               "met": fg < 0.25 * fl if fg and fl else None}
    f = _get(s, "f", "targets", "fleetgate", "growth_mib")
    if f is not None:
        out["download_unbuffered"] = {
            "target": f"fleetgate RSS growth during the download < {DOWNLOAD_BUFFER_MAX_MIB} MiB",
            "value_mib": f, "met": f < DOWNLOAD_BUFFER_MAX_MIB}
    fg_rss = _get(s, "e_requests", "fleetgate", "after", "rss_mib")
    bare_rss = _get(s, "e_requests", "bare", "after", "rss_mib")
    if fg_rss and bare_rss:
        ratio = fg_rss / bare_rss
        out["memory_on_demand"] = {
            "target": f"fleetgate/bare RSS after (e)'s requests <= {RSS_NO_ESTIMATE_MAX} when no rule, "
                      "limit or budget needs a token estimate",
            "value": round(ratio, 3), "met": ratio <= RSS_NO_ESTIMATE_MAX}
    g = _get(s, "e_soak", "fleetgate", "growth_mib")
    if g is not None:
        out["soak_flat"] = {"target": f"fleetgate RSS growth over the soak <= {SOAK_FLAT_MAX_MIB} MiB",
                            "value_mib": g, "met": g <= SOAK_FLAT_MAX_MIB}
    return out


def _mcp_rows(t: Table, c: dict[str, Any]) -> None:
    """(c): tools/list of the 1,000-tool server (filtered by fleetgate), tools/call, and the list
    as one SSE event."""
    total, allowed = c.get("tools_offered"), c.get("tools_allowed")
    prefixes = ", ".join(f"`{p}*`" for p in c.get("allowed_prefixes") or [])

    def perf(label: str, r: dict[str, Any], first_rows: list[tuple[str, Any, Any, Any, str, bool]]) -> None:
        fg, bare, direct = r.get("fleetgate", {}), r.get("bare", {}), r.get("direct", {})
        t.row(label, "requests/s", fg.get("rps"), bare.get("rps"), direct.get("rps"))
        t.row(label, "latency p50 (ms)", fg.get("p50_ms"), bare.get("p50_ms"), direct.get("p50_ms"), nd=2)
        t.row(label, "latency p99 (ms)", fg.get("p99_ms"), bare.get("p99_ms"), direct.get("p99_ms"), nd=2)
        t.row(label, "proxy CPU per request (ms)", fg.get("proxy_cpu_ms_per_req"),
              bare.get("proxy_cpu_ms_per_req"), None, nd=3)
        for metric, f, b, d, tgt, ratios in first_rows:
            t.row(label, metric, f, b, d, tgt, ratios=ratios)

    probe = c.get("probe") or {}
    pf, pb, pd = probe.get("fleetgate", {}), probe.get("bare", {}), probe.get("direct", {})

    def count(p: dict[str, Any], form: str) -> Any:
        n = _get(p, f"list_{form}", "tools")
        return f"{n:,}" if isinstance(n, int) else None

    def size(p: dict[str, Any], form: str) -> Any:
        n = _get(p, f"list_{form}", "bytes")
        return n / 1000 if isinstance(n, int) else None

    def filtered(form: str) -> str:
        f, b = _get(pf, f"list_{form}", "tools"), _get(pb, f"list_{form}", "tools")
        if f is None or b is None:
            return ""
        ok = f == allowed and b == total and _get(pf, f"list_{form}", "exactly_the_allowed_tools")
        return (f"filtered: exactly the {allowed:,} tools the rules allow ({prefixes})" if ok
                else "**not filtered as expected**")

    for i, (conc, r) in enumerate((c.get("list") or {}).items()):
        label = f"(c) MCP tools/list, {total:,} tools, JSON, {conc} agent{'s' if conc != '1' else ''}"
        extra = [] if i else [
            ("tools in the answer", count(pf, "json"), count(pb, "json"), count(pd, "json"),
             filtered("json"), False),
            ("answer size (kB)", size(pf, "json"), size(pb, "json"), size(pd, "json"), "", True),
            ("decision-log bytes per tools/list", pf.get("decision_log_bytes_per_list"), None, None,
             f"info: the record names {pf.get('decision_log_hidden_entries')} of the "
             f"{(total or 0) - (allowed or 0):,} hidden tools", False),
        ]
        perf(label, r, extra)
    for conc, r in (c.get("call") or {}).items():
        label = f"(c) MCP tools/call `{c.get('call_tool')}`, {conc} agent{'s' if conc != '1' else ''}"
        perf(label, r, [])
    for i, (conc, r) in enumerate((c.get("list_sse") or {}).items()):
        label = f"(c) MCP tools/list as one SSE event, {conc} agent{'s' if conc != '1' else ''}"
        extra = [] if i else [("tools in the answer", count(pf, "sse"), count(pb, "sse"), count(pd, "sse"),
                               filtered("sse"), False)]
        perf(label, r, extra)
    refused = _get(pf, "call_not_allowed", "refused")
    if refused is not None:
        code = _get(pf, "call_not_allowed", "answer", "code")
        t.row(f"(c) MCP tools/call `{_get(pf, 'call_not_allowed', 'tool')}` (not allowed)", "answer",
              f"JSON-RPC error {code}" if refused else "**result: not refused**",
              "result (forwarded)", "result", ratios=False)


def _reuse_row(t: Table, label: str, r: dict[str, Any], agents: int | None) -> None:
    """(a): connections the upstream accepted for each target's requests (warm-up included),
    reached by name. One per keep-alive agent is connection reuse working; one per request
    would be issue 13 again (a proxy that never reuses a connection to a name)."""
    def cell(x: dict[str, Any]) -> str | None:
        c, n = x.get("upstream_connections"), x.get("upstream_requests")
        return f"{c:,} / {n:,}" if isinstance(c, int) and isinstance(n, int) else None

    fg, bare, direct = r.get("fleetgate", {}), r.get("bare", {}), r.get("direct", {})
    if cell(fg) is None:
        return
    conns = [x.get("upstream_connections") for x in r.values() if isinstance(x, dict)]
    ok = agents is not None and all(isinstance(c, int) and c <= agents for c in conns)
    verdict = (f"info: keep-alive by name: at most one upstream connection per agent ({agents}), "
               "every target" if ok else "**upstream connections not reused**")
    t.row(label, "upstream connections / requests (by name, warm-up included)", cell(fg), cell(bare),
          cell(direct), verdict, ratios=False)


LIMITED = "fleetgate-limits"  # stack.LIMITED (report.py imports nothing of the running bench)


def _limits_rows(t: Table, label: str, r: dict[str, Any], cost: dict[str, Any],
                 inproc: dict[str, Any]) -> None:
    """(a): fleetgate with the seed's two limits on the bench profile (never refusing), and what
    they cost per request: its CPU per request minus plain fleetgate's, same run, interleaved;
    next to it the limiter's hooks timed in-process (not blurred by the machine's noise)."""
    lim = r.get(LIMITED)
    if not lim:
        return
    bare, direct = r.get("bare", {}), r.get("direct", {})
    t.row(label, "*fleetgate with rate limits (2 buckets per request)*: requests/s", lim.get("rps"),
          bare.get("rps"), direct.get("rps"), "info: the seed's tokens + requests limits, never refusing")
    t.row(label, "*fleetgate with rate limits*: proxy CPU per request (ms)", lim.get("proxy_cpu_ms_per_req"),
          bare.get("proxy_cpu_ms_per_req"), None, nd=3)
    d = cost.get("proxy_cpu_ms_per_req")
    if d is not None:
        share = f", {cost['pct_of_bare']:+.1f}% of bare's" if cost.get("pct_of_bare") is not None else ""
        us = inproc.get("us_per_request_p50")
        hooks = f"; in-process the limiter's hooks take {us:g} µs (p50)" if us is not None else ""
        pct_fg = f"{cost.get('pct_of_fleetgate'):+.1f}% of fleetgate's"
        rounds = cost.get("per_round_ms") or []
        if len(rounds) > 1:
            pct_fg += f" (rounds: {min(rounds):+.3f} … {max(rounds):+.3f} ms)"
        t.row(label, f"*cost of rate limiting*: proxy CPU per request, with limits {MINUS} fleetgate (ms)",
              f"{d:+.3f}", None, None, f"info: {pct_fg}{share}{hooks}", ratios=False)


def _limits_check_row(t: Table, rl: dict[str, Any]) -> None:
    """(a): the limiter really ran: the probe before the clock, and every decision-log record of
    the rate-limited gateway during (a)."""
    chk = rl.get("check")
    if not chk:
        return
    n, took = chk.get("records", 0), chk.get("took_from_every_bucket", 0)
    refused = chk.get("refused_429", 0) + chk.get("denied_otherwise", 0)
    verdict = ("verified: probe (decision log + GET /limits) and every record" if chk.get("ok")
               else "**not every request took from every bucket, or some were refused**")
    settled = chk.get("token_reservations_settled")
    per = (_num(chk.get("tokens_reserved_per_request")), _num(chk.get("tokens_used_per_request")))
    detail = (f"; token reservations settled: {settled:,} (reserved {per[0]}, used {per[1]} per request)"
              if settled is not None else "")
    t.row("(a) rate limits", "requests that took from every bucket / refused",
          f"{took:,} of {n:,} / {refused:,}", None, None, verdict + detail, ratios=False)


GATE_NONE, GATE_STOPS = "fleetgate-no-stops", "fleetgate-stops"  # scenarios.GATE_* (not imported)


def _kill_rows(t: Table, d: dict[str, Any]) -> None:
    """(d): command to cut as the clients saw it (every family stream of every round), the
    gateway's own figure, the check, and what the gate costs per request with stops in force."""
    n, rounds = d.get("streams"), d.get("rounds")
    label = (f"(d) kill switch: cascade stop of a session family, {n} open streams + "
             f"{d.get('bystanders')} bystanders, {rounds} rounds")
    lat = d.get("client_cut_ms") or {}
    per_round = " · ".join(_num(x, 0) for x in d.get("last_cut_ms_per_round") or [])
    t.row(label, "command → stream cut seen by the client, p50 (ms)", lat.get("p50"), None, None,
          f"info: all {lat.get('n', 0):,} family streams, from just before the admin API call to the "
          "client's read error", ratios=False)
    t.row(label, "command → stream cut seen by the client, p95 (ms)", lat.get("p95"), None, None,
          ratios=False)
    t.row(label, "command → last in-flight stream cut, max over rounds (ms)", lat.get("max"), None, None,
          f"info: per round {per_round}", ratios=False)
    gw, answered = d.get("gateway_cut_ms") or {}, d.get("command_answered_ms") or {}
    t.row(label, "gateway `cut_ms` (command received → last flow cut), median / max (ms)",
          f"{_num(gw.get('p50'))} / {_num(gw.get('max'))}", None, None,
          f"info: the admin API answered the stop after {_num(answered.get('p50'), 0)} ms (median; a "
          f"GET /v1/status under the same load: {_num(_get(d, 'admin_status_ms', 'p50'), 0)} ms)",
          ratios=False)
    chk = d.get("check") or {}
    if chk:
        ok = chk.get("ok")
        verdict = ("verified: every family stream cut, every bystander still streaming, each stop lifted "
                   "(unrevoke)" if ok else "**check failed**: " + "; ".join(chk.get("problems") or [])[:300])
        t.row(label, "family streams cut / bystander streams cut",
              f"{chk.get('family_cut', 0):,} of {chk.get('family_total', 0):,} / "
              f"{chk.get('bystanders_cut', 0)} of {chk.get('bystanders_total', 0)}", None, None, verdict,
              ratios=False)
    g = d.get("gate") or {}
    tg = g.get("targets") or {}
    if not tg:
        return
    k = g.get("actions")
    glabel = (f"(d) kill-switch gate, {g.get('agents')} agents with sessions, "
              f"{_num(g.get('graph_sessions'), 0)} sessions in the graph")
    bare, none, stops = tg.get("bare", {}), tg.get(GATE_NONE, {}), tg.get(GATE_STOPS, {})
    for what, r in (("fleetgate, no kill-switch action in force", none),
                    (f"*fleetgate, {k} stops in force (none reaching the load)*", stops)):
        t.row(glabel, f"{what}: requests/s", r.get("rps"), bare.get("rps"))
        t.row(glabel, f"{what}: latency p50 (ms)", r.get("p50_ms"), bare.get("p50_ms"), nd=2)
        t.row(glabel, f"{what}: proxy CPU per request (ms)", r.get("proxy_cpu_ms_per_req"),
              bare.get("proxy_cpu_ms_per_req"), nd=3)
    cost, inproc = g.get("cost") or {}, g.get("in_process") or {}
    if cost.get("proxy_cpu_ms_per_req") is not None:
        rnd = cost.get("per_round_ms") or []
        spread = f" (rounds: {min(rnd):+.3f} … {max(rnd):+.3f} ms)" if len(rnd) > 1 else ""
        share = f", {cost['pct_of_bare']:+.1f}% of bare's" if cost.get("pct_of_bare") is not None else ""
        gate = ""
        if "stops" in inproc:
            gate = (f"; in-process the gate (session graph + verdict) takes {inproc['none']['us_p50']:g} µs "
                    f"with none, {inproc['stops']['us_p50']:g} µs with {k} (p50)")
        applied = g.get("apply_all_s") or []
        took = (f"; applying the {k} through the admin API took {min(applied):.1f} … {max(applied):.1f} s"
                if applied else "")
        t.row(glabel, f"*cost of {k} stops in force*: proxy CPU per request, with {MINUS} without (ms)",
              f"{cost['proxy_cpu_ms_per_req']:+.3f}", None, None,
              f"info: {cost.get('pct_of_fleetgate'):+.1f}% of fleetgate's{spread}{share}{gate}{took}",
              ratios=False)


def merge(base: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Fold the scenarios of a partial run (``run.py --only ... --merge``) into the results of
    the last full run: the scenarios it ran replace theirs (figures, failures, durations,
    noise), every other figure stays, and ``separate_runs`` says when, where and on what tree
    each replaced scenario was measured, so the table can say so. Ratios only ever compare
    targets measured in the same run, so mixing runs this way keeps every ratio honest."""
    out = copy.deepcopy(base)
    ran = list(part.get("durations_s") or {})
    env = part.get("environment") or {}
    for key in ("scenarios", "errors", "durations_s", "other_cpu_cores"):
        out.setdefault(key, {})
    for k in ran:
        for key in ("scenarios", "errors", "durations_s", "other_cpu_cores"):
            out[key].pop(k, None)
            if k in (part.get(key) or {}):
                out[key][k] = part[key][k]
        out.setdefault("separate_runs", {})[k] = {
            "started_at": env.get("started_at"), "wall_s": part.get("wall_s"), "quick": part.get("quick"),
            "environment": env, "driver": part.get("driver"), "setup": part.get("setup"),
            "plan": part.get("plan")}
    keys = {k.split("_")[0] for k in ran}
    out["pending"] = [p for p in base.get("pending") or [] if p[1:].split(")")[0] not in keys]
    out["pending"] += [p for p in part.get("pending") or [] if p not in out["pending"]]
    out["targets_judged"] = judge(out)
    return out


def _separate_note(results: dict[str, Any]) -> list[str]:
    sep = results.get("separate_runs") or {}
    if not sep:
        return []
    notes = []
    for k, r in sep.items():
        env = r.get("environment") or {}
        dirty = " (dirty tree)" if env.get("fleetgate_git_dirty") else ""
        notes.append(
            f"`{k}` in a separate run (`run.py --only {k} --merge`) at {r.get('started_at')}, on "
            f"{env.get('cpu_model')} {X} {env.get('cpu_count')} cores, fleetgate "
            f"`{(env.get('fleetgate_git_sha') or '?')[:12]}`{dirty}"
            f", mitmproxy {(env.get('packages') or {}).get('mitmproxy')}, took {_num(r.get('wall_s'), 0)} s"
            f"{', QUICK smoke run' if r.get('quick') else ''}")
    return ["Measured separately and merged into this run's results: " + "; ".join(notes) +
            ". Every other figure is from the run above; ratios only compare targets of the same run.", ""]


def markdown(results: dict[str, Any]) -> str:
    s = results.get("scenarios", {})
    env = results.get("environment", {})
    targets = results.get("targets_judged") or judge(results)
    pk = env.get("packages", {})
    lines = [
        "# fleetgate benchmark",
        "",
        f"{env.get('started_at', '')} · fleetgate `{(env.get('fleetgate_git_sha') or '?')[:12]}`"
        f"{' (dirty tree)' if env.get('fleetgate_git_dirty') else ''} · mitmproxy {pk.get('mitmproxy')} · "
        f"Python {env.get('python')} · httpx {pk.get('httpx')} · uvicorn {pk.get('uvicorn')} · "
        f"{env.get('cpu_model')} {X} {env.get('cpu_count')} cores · "
        f"run took {_num(results.get('wall_s'), 0)} s"
        f"{' · QUICK smoke run' if results.get('quick') else ''}",
        "",
    ]
    lines += _separate_note(results)
    noise = results.get("other_cpu_cores") or {}
    if noise:
        worst = max(noise, key=lambda k: noise[k])
        lines += [f"Other processes on the machine used up to {noise[worst]:.2f} cores during a scenario "
                  f"(`{worst}`){'; treat that scenario with care' if noise[worst] > 0.2 else ''}.", ""]
    t = Table()

    a = _get(s, "a", "concurrency") or {}
    for conc, r in a.items():
        label = f"(a) {conc} agent{'s' if conc != '1' else ''}"
        fg, bare, direct = r.get("fleetgate", {}), r.get("bare", {}), r.get("direct", {})
        t.row(label, "requests/s", fg.get("rps"), bare.get("rps"), direct.get("rps"))
        t.row(label, "latency p50 (ms)", fg.get("p50_ms"), bare.get("p50_ms"), direct.get("p50_ms"), nd=2)
        t.row(label, "latency p99 (ms)", fg.get("p99_ms"), bare.get("p99_ms"), direct.get("p99_ms"), nd=2)
        tgt = ""
        if conc == "16" and "cpu_overhead" in targets:
            c = targets["cpu_overhead"]
            tgt = _met(c["met"], f"+{(c['value'] - 1) * 100:.0f}% vs ≤ +15%") if c["value"] else ""
        t.row(label, "proxy CPU per request (ms)", fg.get("proxy_cpu_ms_per_req"),
              bare.get("proxy_cpu_ms_per_req"), None, tgt, nd=3)
        _reuse_row(t, label, r, int(conc) if conc.isdigit() else None)
        plain = r.get("fleetgate-nollm")
        if plain:
            t.row(label, "*fleetgate, upstream not an LLM provider*: requests/s", plain.get("rps"),
                  bare.get("rps"), direct.get("rps"), "info: cost of LLM inspection + metering")
            t.row(label, "*fleetgate, upstream not an LLM provider*: proxy CPU per request (ms)",
                  plain.get("proxy_cpu_ms_per_req"), bare.get("proxy_cpu_ms_per_req"), None, nd=3)
        _limits_rows(t, label, r, _get(s, "a", "rate_limits", "cost", conc) or {},
                     _get(s, "a", "rate_limits", "in_process") or {})
    _limits_check_row(t, _get(s, "a", "rate_limits") or {})

    b = _get(s, "b", "targets") or {}
    if b:
        label = f"(b) SSE {_get(s, 'b', 'events')} events {X} {_num(_get(s, 'b', 'interval_ms'), 0)} ms"
        fg, bare, direct = b.get("fleetgate", {}), b.get("bare-sse", {}), b.get("direct", {})
        tt = targets.get("ttfe", {})
        tgt = (_met(tt.get("met"), f"{tt['value_ms']:+.2f} ms vs ≤ +5 ms")
               if tt.get("value_ms") is not None else "")
        t.row(label, "time to first event p50 (ms)", fg.get("ttfe_p50_ms"), bare.get("ttfe_p50_ms"),
              direct.get("ttfe_p50_ms"), tgt, nd=2)
        t.row(label, "time to first event p99 (ms)", fg.get("ttfe_p99_ms"), bare.get("ttfe_p99_ms"),
              direct.get("ttfe_p99_ms"), nd=2)
        st = targets.get("sse_streamed", {})
        t.row(label, "time to last event p50 (ms)", fg.get("ttle_p50_ms"), bare.get("ttle_p50_ms"),
              direct.get("ttle_p50_ms"), _met(st.get("met"), "not buffered") if st else "", nd=2)
        t.row(label, "time to last event p99 (ms)", fg.get("ttle_p99_ms"), bare.get("ttle_p99_ms"),
              direct.get("ttle_p99_ms"), nd=2)
        buf = b.get("bare", {})
        t.row(label, "bare mitmdump *buffering* SSE (default): first event p50 (ms)", None,
              buf.get("ttfe_p50_ms"), direct.get("ttfe_p50_ms"), "info: what StreamPassthrough avoids", nd=1)

    c = s.get("c") or {}
    if c:
        _mcp_rows(t, c)

    d = s.get("d") or {}
    if d:
        _kill_rows(t, d)

    er = s.get("e_requests") or {}
    if er:
        label = f"(e) after {er.get('requests'):,} requests"
        mo = targets.get("memory_on_demand", {})
        mo_tgt = (_met(mo.get("met"), f"{_num(mo.get('value'), 2)}{X} vs ≤ {RSS_NO_ESTIMATE_MAX:g}{X}")
                  if mo else "")
        t.row(label, "RSS, rules needing no token estimate (MiB)", _get(er, "fleetgate", "after", "rss_mib"),
              _get(er, "bare", "after", "rss_mib"), target=mo_tgt)
        t.row(label, "peak RSS, VmHWM (MiB)", _get(er, "fleetgate", "after", "hwm_mib"),
              _get(er, "bare", "after", "hwm_mib"))
        t.row(label, "RSS at start (MiB)", _get(er, "fleetgate", "before", "rss_mib"),
              _get(er, "bare", "before", "rss_mib"))
        lim = er.get("fleetgate-limits")
        if lim:
            t.row(label, "RSS, rules needing a token estimate (`type: tokens` limit) (MiB)",
                  _get(lim, "after", "rss_mib"), _get(er, "bare", "after", "rss_mib"),
                  target="info: what the tokenizer table costs")
        mapped = {n: _get(er, n, "tiktoken_mapped") for n in ("fleetgate", "fleetgate-limits")}
        if any(v is not None for v in mapped.values()):
            t.row(label, "tokenizer loaded (no estimate needed / needed)",
                  f"{_yes(mapped['fleetgate'])} / {_yes(mapped['fleetgate-limits'])}", "—",
                  ratios=False, target="expected: no / yes")
    es = s.get("e_streams") or {}
    if es:
        label = f"(e) {es.get('streams')} concurrent streams"
        fg, bare = es.get("fleetgate", {}), es.get("bare-sse", {})
        t.row(label, "peak RSS (MiB)", fg.get("peak_rss_mib"), bare.get("peak_rss_mib"))
        t.row(label, "RSS per open stream (KiB)", fg.get("per_stream_kib"), bare.get("per_stream_kib"))
        t.row(label, "time to first event p99, all connecting at once (ms)", fg.get("ttfe_p99_ms"),
              bare.get("ttfe_p99_ms"), nd=1)
    so = s.get("e_soak") or {}
    if so:
        label = f"(e) soak {_num(_get(so, 'plan', 'duration'), 0)} s"
        fg, bare = so.get("fleetgate", {}), so.get("bare", {})
        sf = targets.get("soak_flat", {})
        t.row(label, f"RSS growth, last vs first {_num(fg.get('window_s'), 0)} s (MiB)", fg.get("growth_mib"),
              bare.get("growth_mib"), None, _met(sf.get("met"), f"≤ {SOAK_FLAT_MAX_MIB:g} MiB") if sf else "",
              nd=2, ratios=False)
        t.row(label, "RSS, last window (MiB)", fg.get("last_window_mib"), bare.get("last_window_mib"))
        t.row(label, "requests (errors)", f"{fg.get('requests', 0):,} ({fg.get('errors', 0)})",
              f"{bare.get('requests', 0):,} ({bare.get('errors', 0)})", ratios=False)

    f = _get(s, "f", "targets") or {}
    if f:
        label = f"(f) {(_get(s, 'f', 'bytes') or 0) / 1e6:.0f} MB download"
        fg, bare, direct = f.get("fleetgate", {}), f.get("bare", {}), f.get("direct", {})
        t.row(label, "time (s)", fg.get("seconds"), bare.get("seconds"), direct.get("seconds"), nd=3)
        t.row(label, "throughput (MB/s)", fg.get("mb_per_s"), bare.get("mb_per_s"), direct.get("mb_per_s"))
        du = targets.get("download_unbuffered", {})
        t.row(label, "proxy RSS growth during download (MiB)", fg.get("growth_mib"), bare.get("growth_mib"),
              None, _met(du.get("met"), f"< {DOWNLOAD_BUFFER_MAX_MIB:g} MiB") if du else "", ratios=False)

    lines += t.rows
    lines += ["",
              "*bare mitmdump*: the same mitmdump, no scripts, `stream_large_bodies=1m`. In (b) and the "
              "streams rows of (e) it is `stream_large_bodies=1` (*bare-sse*), because bare mitmdump buffers "
              "a whole SSE response; the (b) *buffering* row shows that default. In (c) bare mitmdump "
              "passes the MCP answers unread (it returns all 1,000 tools), fleetgate judges and filters "
              "them for the agent. "
              "Proxy CPU per request is the proxy process's user+system CPU over the run divided by the "
              "requests answered. *direct* at 16 agents is limited by the load generator, not the upstream.",
              ""]

    g = s.get("g") or {}
    if g:
        sm, sc = _get(g, "in_process", "small") or {}, _get(g, "in_process", "scale") or {}
        gw = g.get("gateway") or {}
        thr = gw.get("throughput") or {}
        lines += [
            f"**(g) rules scale** — {sc.get('profiles', '?'):,} agent profiles / "
            f"{sc.get('rules', '?'):,} rules "
            f"({(g.get('policy_bytes') or 0) / 1024:.0f} KiB YAML), deciding for `{sc.get('agent')}` "
            "(near the end of the list)",
            "",
            f"| metric | small policy ({sm.get('profiles')} profiles, {sm.get('rules')} rules) | "
            "scale policy | scale/small |",
            "|---|---:|---:|---:|",
        ]

        def grow(metric: str, small: Any, scale: Any, nd: int = 1) -> None:
            lines.append(f"| {metric} | {_num(small, nd)} | {_num(scale, nd)} | {_ratio(scale, small)} |")

        grow("load + validate + compile, in-process (ms)", sm.get("load_ms"), sc.get("load_ms"))
        grow("request_facts + decide p50 (µs)", sm.get("facts_plus_decide_p50_us"),
             sc.get("facts_plus_decide_p50_us"))
        grow("request_facts + decide p99 (µs)", sm.get("facts_plus_decide_p99_us"),
             sc.get("facts_plus_decide_p99_us"))
        grow("decide only p50 (µs)", sm.get("decide_p50_us"), sc.get("decide_p50_us"))
        fs, fsc = thr.get("fleetgate", {}), thr.get("fleetgate-scale", {})
        grow("in the gateway: mean decision time, fleetgate_decision_seconds (µs)",
             fs.get("in_gateway_decision_mean_us"), fsc.get("in_gateway_decision_mean_us"))
        grow(f"in the gateway: requests/s at {fs.get('agents', '?')} agents", fs.get("rps"), fsc.get("rps"))
        grow("in the gateway: latency p50 (ms)", fs.get("p50_ms"), fsc.get("p50_ms"), 2)
        grow("in the gateway: proxy CPU per request (ms)", fs.get("proxy_cpu_ms_per_req"),
             fsc.get("proxy_cpu_ms_per_req"), 3)
        rl = gw.get("reloads") or {}
        lines += [
            f"| gateway start to listening (s) | — | {_num(gw.get('startup_s'), 2)} | — |",
            "| hot reload, file written → new revision in /healthz/ready, p50 / max (ms; watcher polls "
            f"every {gw.get('reload_poll_ms')} ms) | — | {_num(rl.get('p50_ms'), 0)} / "
            f"{_num(rl.get('max_ms'), 0)} | — |",
            "| longest request during a reload (ms; p50 otherwise "
            f"{_num(rl.get('request_p50_ms_outside_reload'), 2)}) | — | "
            f"{_num(rl.get('request_max_ms_during_reload'), 0)} | — |",
            f"| gateway RSS idle (MiB) | {_num(_get(s, 'e_requests', 'fleetgate', 'before', 'rss_mib'))} | "
            f"{_num(gw.get('rss_idle_mib'))} | — |",
            "",
        ]

    pending = results.get("pending") or []
    if pending:
        lines += ["Not measured yet: " + "; ".join(pending) + ".", ""]
    errors = results.get("errors") or {}
    if errors:
        lines += ["**Scenario failures:** " + "; ".join(f"{k}: {v}" for k, v in errors.items()), ""]
    return "\n".join(lines)
