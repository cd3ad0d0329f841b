"""Judging results: Dice and HD95 against references, and synthetic phantoms with known labels."""
