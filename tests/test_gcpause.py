"""The garbage collector pause around header parsing and planning leaves the collector as it was."""
from __future__ import annotations

import gc

import pytest

from synthetic import make_mistral
from tensorsurgery import api
from tensorsurgery.errors import HeaderError, PlanError
from tensorsurgery.formats.safetensors import read_header
from tensorsurgery.io.gcpause import paused_gc


def test_pause_restores_enabled_collector_after_an_error():
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with paused_gc():
            assert not gc.isenabled()
            raise RuntimeError("boom")
    assert gc.isenabled()


def test_nested_pauses_leave_it_as_the_outermost_found_it():
    with paused_gc():
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block found it paused: it stays paused
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled():
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_read_header_restores_the_collector_on_a_bad_header(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((4).to_bytes(8, "little") + b"{x} ")
    with pytest.raises(HeaderError):
        read_header(bad)
    assert gc.isenabled()


def test_planning_restores_the_collector_on_a_plan_error_and_after_a_plan(tmp_path):
    make_mistral(tmp_path / "src")
    text = f'[source]\nmodel = "{tmp_path / "src"}"\n[layers]\nplan = "dus"\noverlap = {{}}\n' \
           f'[output]\npath = "{tmp_path / "out"}"\n'
    with pytest.raises(PlanError):
        api.plan(text.format(1000))
    assert gc.isenabled()
    assert api.plan(text.format(1)).layers  # a plan was made, and the collector is back on
    assert gc.isenabled()


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_objects_made_while_paused_are_not_walked_at_once_but_cycles_are_still_freed():
    import weakref
    with paused_gc():
        made = [(i, str(i)) for i in range(50_000)]  # tracked tuples, counted as new allocations
        cycle = _Node()
    ref = weakref.ref(cycle)
    del cycle
    # Promoted to the oldest generation on exit: the young generation starts empty again, so the
    # next allocation does not walk the 50,000 tuples.
    assert gc.get_count()[0] < 1_000
    gc.collect()
    assert ref() is None  # the next full collection still finds the cycle
    assert len(made) == 50_000


def test_objects_the_program_froze_stay_frozen():
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with paused_gc():
            _ = [(i,) for i in range(1000)]
        # unfreeze() would leave none frozen. Not ==: a frozen object that dies meanwhile (a
        # frame of an earlier test's daemon thread ending) leaves the count: CI saw 644,607 of 644,609.
        assert gc.get_freeze_count() > frozen - 100
    finally:
        gc.unfreeze()
