"""Export configuration (the ``export`` block of an exported config.json)."""
