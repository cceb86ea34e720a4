"""Observability: OpenTelemetry spans and metrics, trace trees, from the decision records."""
