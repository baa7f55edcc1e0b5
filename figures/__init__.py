"""rmdyn.figures: one function per figure; data in (a results JSON or result object), PNG + JSON out."""

__all__ = []
