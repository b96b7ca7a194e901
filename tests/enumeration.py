"""Brute-force enumeration helpers shared by the tests of the structured programs."""


def compositions(n: int, D: int):
    """All ways to write n as an ordered sum of parts in 1..D (the segmentations of n tokens)."""
    if n == 0:
        yield ()
        return
    for d in range(1, min(D, n) + 1):
        for rest in compositions(n - d, D):
            yield (d,) + rest
