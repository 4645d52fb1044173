"""The report: tables and plots read from a run directory; it never runs a model."""
