"""The payer's report: figures from the database (figures.py), rendered as a table (table.py), CSV (csv_out.py),
JSON (json_out.py) or an HTML page (html.py, template report.html); render.py picks the rendering and writes it."""
