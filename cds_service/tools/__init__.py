"""Command-line tools for people who call CDS services: the hook caller, request signing, the conformance check."""
