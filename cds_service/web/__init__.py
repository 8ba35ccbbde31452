"""The Flask side: the app factory, the CDS Hooks blueprint, JSON in and out, errors, the viewer and the policy page."""
