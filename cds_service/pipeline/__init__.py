"""The hook pipeline: hook request → parsed hook context → decisions → cards → response JSON.

Pure logic over JSON and the policy packs in cards/: nothing here imports Flask, SQLAlchemy or an HTTP
library (tests/test_layout.py checks it). Patient data that must be fetched comes through the `FhirFetcher`
protocol (pipeline/patient.py); the web layer stores what the pipeline issued.
"""
