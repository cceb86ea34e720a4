"""Local stand-ins for the services agents call: an LLM provider speaking the OpenAI and
Anthropic wire formats and an MCP server (the official SDK's). One code base for the offline
demo (``fleetgate demo``) and the end-to-end tests. They need the ``demo`` extra (the MCP SDK
and uvicorn); the gateway itself never imports them.
"""
