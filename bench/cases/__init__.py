"""One module per benchmark case: ``TITLE``, ``missing()`` (why it cannot run, or None) and ``run(settings)``."""
