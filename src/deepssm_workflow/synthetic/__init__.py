"""Synthetic cohorts with exact ground-truth correspondences (femur, metopic, left atrium)."""
