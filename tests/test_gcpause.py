"""The garbage collector pause around header parsing and planning leaves the collector as it was."""
from __future__ import annotations

import gc

import pytest

from tensorsurgery import api
from tensorsurgery.errors import HeaderError, PlanError
from tensorsurgery.format import read_header
from tensorsurgery.gcpause import paused_gc
from tensorsurgery.synthetic import make_mistral


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
