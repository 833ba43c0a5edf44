"""Prefix order: a file's requests fed so that those sharing a prompt prefix run
back to back, while vLLM's prefix cache still holds it.

A live server sees requests as they come; a dropped file is complete before it
runs. vLLM's automatic prefix cache only helps while a prefix is resident, and
in input order requests that share one are scattered, so the cache evicts it
between uses. During the validation pass (which reads the whole file anyway)
every runnable line gets one 64-bit sort key:

- four short hashes of its prefix text at growing lengths (256, 1,024, 4,096
  and 16,384 characters): sorting by them in turn puts lines that share the
  longest prefix next to each other (a trie walked depth first, in hashes);
- its expected output length (the line's own max_tokens);
- its place in the file (ties keep input order).

When the file is read, one sort finds each line's group: the deepest level it
shares with a neighbour. A second sort orders by group, then longest expected
output first inside it (decode-heavy first, as BatchLLM does, so a group's long
tails overlap its short requests), then input order. Each group's leader is
sent one group early, so it has computed the shared prefix before the rest of
its group is admitted (requests admitted in the same step cannot share blocks
that none of them has computed yet). Lines that share nothing with any other
go first, in file order.

The prefix text is what a chat template renders first: the tools, then each
message's role and content; a completion's prompt; a response's instructions
and input. Only keys, offsets and line numbers are kept (20 bytes a line), so
a million-line file costs ~20 MB, and the order is only ever a speed-up: the
checkpoint, cancel and the one-output-line promise do not depend on it, and
results are published in input order.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from typing import Any, Iterator

from ..lines import PREFIX_FAMILY_CHARS, Request, prefix_text

LEVELS = (PREFIX_FAMILY_CHARS, 1024, 4096, 16384)  # characters of prefix text hashed at each level
BITS = (12, 10, 8, 4)  # bits kept of each level's hash
OUT_BITS = 6  # expected output length, log-scaled, longest first
INDEX_BITS = 24  # the line's index in the file: at most 16.7 million lines


def expected_output(body: dict[str, Any]) -> int:
    """The line's own output limit; 0 (shortest) when it leaves it to the profile."""
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def sort_key(body: dict[str, Any]) -> int:
    """The 40-bit key: prefix hashes level by level, then longest output first."""
    text = prefix_text(body).encode("utf-8", "surrogatepass")
    key = 0
    for length, bits in zip(LEVELS, BITS):
        digest = hashlib.blake2b(text[:length], digest_size=4).digest()
        key = (key << bits) | (int.from_bytes(digest, "big") >> (32 - bits))
    out = expected_output(body)
    bucket = min((1 << OUT_BITS) - 1, int(4 * math.log2(out + 1)))
    return (key << OUT_BITS) | ((1 << OUT_BITS) - 1 - bucket)


# Masks over a key's prefix part keeping its first k levels, k = 0..4.
_PREFIX_BITS = sum(BITS)
_KEEP = [((1 << sum(BITS[:k])) - 1) << (_PREFIX_BITS - sum(BITS[:k])) for k in range(5)]


def _shared_levels(a: int, b: int) -> int:
    """How many leading levels two keys' prefix parts share."""
    k = 0
    while k < len(BITS) and (a & _KEEP[k + 1]) == (b & _KEEP[k + 1]):
        k += 1
    return k


class PrefixOrder:
    """Collects (key, offset, line) during validation; yields offsets in order."""

    def __init__(self) -> None:
        self.entries = array("Q")
        self.offsets = array("Q")
        self.lines = array("I")
        self.overflow = False  # more lines than an index holds: use input order

    def add(self, request: Request, offset: int) -> None:
        index = len(self.offsets)
        if index >= 1 << INDEX_BITS:
            self.overflow = True
            return
        self.entries.append((sort_key(request.body) << INDEX_BITS) | index)
        self.offsets.append(offset)
        self.lines.append(request.line)

    def sequence(self) -> Iterator[tuple[int, int]]:
        """(line number, byte offset) of every collected line, in prefix order."""
        index_mask = (1 << INDEX_BITS) - 1
        out_mask = (1 << OUT_BITS) - 1
        shift = INDEX_BITS + OUT_BITS
        full = array("Q", sorted(self.entries))
        grouped = array("Q")
        for i, entry in enumerate(full):
            prefix = entry >> shift
            depth = max(_shared_levels(prefix, full[i - 1] >> shift) if i else 0,
                        _shared_levels(prefix, full[i + 1] >> shift) if i + 1 < len(full)
                        else 0)
            group = prefix & _KEEP[depth]  # the levels it shares with some other line
            out = (entry >> INDEX_BITS) & out_mask
            grouped.append((((group << OUT_BITS) | out) << INDEX_BITS) | (entry & index_mask))
        del full
        # Each group's first request (its leader) goes out one group early, ahead
        # of the previous group's followers: by the time a group's followers are
        # admitted, its leader has computed the shared prefix, so they find it in
        # the cache instead of all computing it in the same step.
        shift_group = INDEX_BITS + OUT_BITS
        current = 0  # the group whose followers are held back
        followers = array("Q")
        for entry in sorted(grouped):
            group = entry >> shift_group
            if group == 0:  # shares nothing with any other line
                yield self._at(entry & index_mask)
            elif group != current:
                yield self._at(entry & index_mask)  # the new group's leader
                for held in followers:
                    yield self._at(held & index_mask)
                current, followers = group, array("Q")
            else:
                followers.append(entry)
        for held in followers:
            yield self._at(held & index_mask)

    def _at(self, index: int) -> tuple[int, int]:
        return self.lines[index], self.offsets[index]
