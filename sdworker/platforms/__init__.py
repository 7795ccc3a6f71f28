"""What drives app.py: each platform receives the app (its init and handler) at run time."""
