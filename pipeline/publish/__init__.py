"""st publish stage."""
