"""The analyses behind benchmarks/results: each module answers one question and renders the table
committed there, so that the benchmarks/ scripts stay argument parsing and file writing and the
tests import the logic they check."""
