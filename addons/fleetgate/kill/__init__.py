"""The kill switch's pure core: who may act on whom (scopes), what they do (stop, pause,
throttle), the session graph that makes "kill the parent" reach the children, automatic
triggers, and the durable store. No mitmproxy import anywhere in this package."""
