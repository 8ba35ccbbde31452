"""The payer's report: figures from the database, rendered as a table, CSV, JSON or an HTML page."""
