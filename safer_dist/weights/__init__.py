"""Weight sync from the learners to the rollout workers: channels, full and adapters-only pushes."""
