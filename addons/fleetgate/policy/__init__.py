"""Policy: the rules model, its loader and the pure decision function. No mitmproxy here."""
