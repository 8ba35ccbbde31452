"""Trusting CDS clients (CDS Hooks 2.0): the trusted-clients file, their key sets, and the JWT checks."""
