"""Scheduler service: REST API, experiment storage and the orchestrator that drives GradAlign rounds."""
