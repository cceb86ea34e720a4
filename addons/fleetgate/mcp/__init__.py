"""MCP traffic: JSON-RPC messages, the facts rules see, list filtering. No mitmproxy."""
