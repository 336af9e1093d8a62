"""Fresh command and entity ids: version-4 UUIDs cut from a pooled ``os.urandom`` read."""

from __future__ import annotations

import os
from uuid import UUID

import pytest

from commands.service import _RandomIds


def test_ids_are_random_version_4_and_never_repeat_across_many_pool_refills() -> None:
    ids = _RandomIds()
    drawn = [ids() for _ in range(_RandomIds.BATCH * 4 + 3)]
    assert all(isinstance(i, UUID) and i.version == 4 and i.variant == "specified in RFC 4122"
               for i in drawn)
    assert len(set(drawn)) == len(drawn)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_reuse_the_parents_unread_ids() -> None:
    ids = _RandomIds()
    ids()  # the pool now holds unread ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its next id to the parent
        os.close(read)
        os.write(write, ids().bytes)
        os._exit(0)
    os.close(write)
    child = UUID(bytes=os.read(read, 16))
    os.close(read)
    os.waitpid(pid, 0)
    assert child != ids()
