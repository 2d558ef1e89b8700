"""st prepare stage."""
