"""Tensor-level building blocks: N:M masks and the retained score, mask generators (scorers),
heuristic permutation solvers, log-domain Sinkhorn and hardening, the groupwise permuter, and
operations that reorder a layer's rows or columns. Nothing here knows about models."""
