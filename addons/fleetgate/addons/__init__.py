"""mitmproxy addons: thin, one concern each. :func:`pipeline.pipeline` fixes their order."""
