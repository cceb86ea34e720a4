"""LLM traffic: provider recognition, request facts, usage accounting, pricing. No mitmproxy."""
