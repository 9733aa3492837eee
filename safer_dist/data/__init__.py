"""Data: the record schema and loaders for user data, and the seeded demo data set."""
