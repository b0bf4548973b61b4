"""Runs on one server: a job's party, or the long-running recognition gateway. Sees only shares, sizes and ids;
imports nothing from orchestration.client."""
