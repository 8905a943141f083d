"""Union-Eyes pilot operations: Prefect flows that automate the pilot runbook."""

__version__ = "0.1.0"
