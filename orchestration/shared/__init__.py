"""What the client and the servers must agree on: the service's wire format and the plaintext float64 reference."""
