"""Where studies come from (``StudySource`` implementations)."""
