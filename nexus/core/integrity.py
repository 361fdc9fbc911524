"""The plaintext ``generation`` column checked against the ciphertext header (the truth).

Every record's blob starts with the envelope header, which names the root key generation it
is encrypted under and is authenticated (part of the associated data). The ``generation``
column is only an index of it, kept in plaintext so the store can count and scan by
generation. A wrong cell (a damaged or edited database) must not make the store
unrecoverable, nor stall a rotation, so:

- recovery asks which generations the records need from their *headers*
  (:func:`needed_generations`); a header naming a generation this Nexus never created
  cannot be opened by any key and is reported, not required;
- after every unseal, cells that disagree with a valid header naming a generation this
  node holds are set to the header's value (:func:`reconcile_generation_cells`): only the
  index column changes, never a ciphertext. Every disagreement is logged.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import structlog

from nexus.store.base import GenerationMismatch, RecordKey, Store

log = structlog.get_logger("nexus.integrity")

SCAN_BATCH = 500
LOGGED_ROWS = 20
"""Disagreeing rows logged one by one (then only counted), so a wholesale edit cannot flood
the log."""


@dataclass
class GenerationReport:
    """What :func:`reconcile_generation_cells` found and did."""

    mismatched: int = 0  # rows whose cell differed from their header (valid or not)
    fixed: int = 0  # cells set to the header's generation
    unreadable: int = 0  # rows whose blob has no valid header (left alone)
    unheld: int = 0  # valid headers naming a generation this node does not hold (left alone)
    examples: list[GenerationMismatch] = field(default_factory=list)


def needed_generations(store: Store, recorded: Collection[int]) -> set[int]:
    """Generations the stored records need, by their ciphertext headers.

    With ``recorded`` (the generations this Nexus created and still records) non-empty,
    a header naming any other generation, or no valid header, is reported and not counted:
    no key this Nexus has or had opens such a record, and it reads as an integrity failure.
    """
    by_header = store.count_by_header_generation()
    needed: set[int] = set()
    foreign: dict[int, int] = {}
    for generation, count in by_header.items():
        if count <= 0:
            continue
        if generation == 0 or (recorded and generation not in recorded):
            foreign[generation] = count
        else:
            needed.add(generation)
    if foreign:
        log.error("records whose ciphertext header names no generation this Nexus created; "
                  "they fail their integrity check and are not required from the backup",
                  generations=sorted(g for g in foreign if g), records=sum(foreign.values()),
                  unreadable=foreign.get(0, 0))
    by_column = {g: n for g, n in store.count_by_generation().items() if n}
    if by_column != {g: n for g, n in by_header.items() if n}:
        log.error("the generation column disagrees with the ciphertext headers; the headers "
                  "are trusted", by_column=_str_keys(by_column),
                  by_header=_str_keys(by_header))
    return needed


def reconcile_generation_cells(store: Store, held: Collection[int]) -> GenerationReport:
    """Find every record whose generation cell disagrees with its header; set the cell to
    the header's generation where the header is valid and names a generation in ``held``;
    log all of it. Returns what was found and done."""
    report = GenerationReport()
    after: RecordKey | None = None
    while True:
        rows = store.generation_mismatches(after, SCAN_BATCH)
        if not rows:
            break
        after = rows[-1].key
        fixable = []
        for row in rows:
            report.mismatched += 1
            if row.header == 0:
                report.unreadable += 1
            elif row.header not in held:
                report.unheld += 1
            else:
                fixable.append(row)
            if len(report.examples) < LOGGED_ROWS:
                report.examples.append(row)
                log.error("generation cell disagrees with the ciphertext header",
                          kind=row.kind, path=row.path, version=row.version,
                          cell=row.cell, header=row.header or None,
                          action="cell set to the header's generation" if row in fixable
                          else "left alone (no key of this node opens it)")
        report.fixed += store.fix_generation_cells(fixable)
    if report.mismatched:
        log.error("generation cells reconciled with the ciphertext headers",
                  mismatched=report.mismatched, fixed=report.fixed,
                  unreadable=report.unreadable, other_generation=report.unheld)
    return report


def _str_keys(counts: dict[int, int]) -> dict[str, int]:
    return {str(g): n for g, n in sorted(counts.items())}
