"""Process-level plumbing shared by every job: the logger, atomic file writes, metrics and progress, graceful stop, fault injection."""
