"""Command-line interfaces (``nkudo-edge``)."""
