"""Small real models and bundled data behind the quickstart recipe."""
