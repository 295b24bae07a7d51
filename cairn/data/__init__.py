"""Data for training: dedup, filters, synthetic data written by a teacher."""
