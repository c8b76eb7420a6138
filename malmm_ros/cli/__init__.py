"""Command-line tools; each turns a MalmmError into one `ERROR:` line and exit code 1."""
