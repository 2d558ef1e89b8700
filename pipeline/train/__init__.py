"""st train stage."""
