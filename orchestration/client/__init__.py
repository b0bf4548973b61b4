"""Runs on the data owner's client: holds the plaintext (embeddings, labels, names, queries), makes shares,
reconstructs and decides. Nothing here runs on a server."""
