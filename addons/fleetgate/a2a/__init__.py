"""Agent2Agent (A2A) messages: strict parsing, the facts rules see, hop depth counted by the gateway."""
