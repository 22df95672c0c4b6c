"""Cache-slot arithmetic for sink+window (streaming) heads.

A streaming head lets the query at absolute position ``p`` see key ``j`` iff
``j <= p`` and (``j < sink`` or ``j > p - recent``). Everything here is plain
integer arithmetic so it can be shared by the torch path, the Triton kernels
and the tests.
"""

from __future__ import annotations


def streaming_key_ranges(q_start: int, q_end: int, sink: int, recent: int) -> list[tuple[int, int]]:
    """Half-open key-position ranges that queries at ``[q_start, q_end)`` may see.

    The ranges are disjoint and sorted; together they hold at most
    ``sink + recent + (q_end - q_start) - 1`` positions, independent of the
    context length, which is what keeps streaming heads O(S+W) per query.
    """
    if q_end <= q_start:
        return []
    window_start = max(q_start - recent + 1, 0)
    if window_start <= sink:
        return [(0, q_end)]
    return [(0, min(sink, q_end)), (window_start, q_end)]


def streaming_visible(query_pos: int, key_pos: int, sink: int, recent: int) -> bool:
    """Whether a streaming head's query at ``query_pos`` sees ``key_pos``."""
    return key_pos <= query_pos and (key_pos < sink or key_pos > query_pos - recent)


def max_live_tokens(seq_len: int, sink: int, recent: int) -> int:
    """Tokens a streaming head must keep cached for a sequence of ``seq_len``."""
    return min(seq_len, sink + recent)
