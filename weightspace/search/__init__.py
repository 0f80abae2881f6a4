"""search: weights + an evaluator → chosen weights — greedy soups and leaderboards, learned soups, a merge's λ, and
permutation alignment (Git Re-Basin). ``align`` itself is ``weightspace.align`` (or ``weightspace.search.align.align``): the
name ``weightspace.search.align`` is its module."""
from __future__ import annotations

from .align import AlignmentError
from .greedy import GreedyResult, greedy_soup
from .soups import Leaderboard, soup_leaderboard
from .learned import LearnedSoupResult, learned_soup
from .result import SearchResult

__all__ = ["greedy_soup", "soup_leaderboard", "GreedyResult", "Leaderboard", "learned_soup", "LearnedSoupResult",
           "AlignmentError", "SearchResult"]
