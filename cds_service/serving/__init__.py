"""Running the service: the production web server (gunicorn managing workers that serve with granian), its
request bridge and its log handler."""
