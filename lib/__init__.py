"""countries-medallion: the shared library behind the stage notebooks (one module per concern)."""
