"""The ``vocabseg`` command line."""
