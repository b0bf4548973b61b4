"""Orchestration: compile the MPC programs, run the two servers, reconstruct results on the client."""
