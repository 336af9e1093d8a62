"""The one check of a status move: each aggregate declares its table of allowed moves
(``status → statuses it may become``; final statuses have none) and asks this before a move."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import TypeVar

from domain.errors import IllegalTransition

S = TypeVar("S", bound=StrEnum)


def require_transition(transitions: Mapping[S, frozenset[S]], current: S, target: S,
                       what: str, field: str = "status") -> None:
    """Raises ``IllegalTransition`` (on ``field``) unless ``what`` may move from ``current``
    to ``target``."""
    if target not in transitions[current]:
        raise IllegalTransition(
            f"{what} is {current.value}; it cannot become {target.value}", field=field)


def transition_table(statuses: type[S], moves: Mapping[S, Iterable[S]]
                     ) -> dict[S, frozenset[S]]:
    """The table of allowed moves of ``statuses``, in their order: ``moves`` names where each
    status that has exits may go; every status it leaves out is final (no exits)."""
    return {status: frozenset(moves.get(status, ())) for status in statuses}
