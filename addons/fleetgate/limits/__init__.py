"""Rate limits (token buckets) and budgets. No mitmproxy."""
