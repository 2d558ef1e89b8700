"""st cache stage."""
