"""Running the service: the production web server (gunicorn managing waitress workers) and its log handler."""
