"""Ray actors: thin shells that put the ``disagg`` engines behind remote methods."""
