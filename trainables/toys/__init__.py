"""Toy systems of docs/theory.md §8: the isotropic-noise (vMF) walkers and the 3D sphere toy."""
