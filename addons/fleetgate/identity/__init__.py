"""Identity: proxy credentials to verified JWT claims. No mitmproxy here."""
