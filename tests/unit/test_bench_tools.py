"""The benchmark's own parsing: what its figures are read from."""

from __future__ import annotations

from pathlib import Path

from bench.instructions import callgrind_inclusive

#: A callgrind dump in the format valgrind writes: compressed names ``(id) name`` given
#: once, relative positions, and after ``calls=`` the inclusive cost of that call.
DUMP = """\
version: 1
creator: callgrind-3.19.0
events: Ir
fl=(1) main.c
fn=(1) main
10 10
cfn=(2) handle
calls=1 20
+1 100
fn=(2)
20 60
+2 5
cfn=(3) leaf
calls=2 30
* 35
cfn=(2)
calls=1 20
-1 7
fl=(2) leaf.c
fn=(3)
30 35
totals: 110
"""


def test_inclusive_costs_add_calls_to_other_functions_once(tmp_path: Path) -> None:
    """A function's inclusive cost is its own lines plus its calls to other functions; a
    call to itself (already in its own lines) is not added again."""
    dump = tmp_path / "callgrind.out"
    dump.write_text(DUMP)
    inclusive = callgrind_inclusive(dump)
    assert inclusive["leaf"] == 35
    assert inclusive["handle"] == 60 + 5 + 35  # not the 7 of its call to itself
    assert inclusive["main"] == 10 + 100


def test_inclusive_costs_read_the_ir_column_after_every_position(tmp_path: Path) -> None:
    """With ``--dump-instr=yes`` a cost line starts with an address and a line number."""
    dump = tmp_path / "callgrind.out"
    dump.write_text("positions: instr line\nevents: Ir\nfn=(1) main\n0x10 3 4\n"
                    "cfn=(2) leaf\ncalls=1 0x20 9\n+4 * 6\nfn=(2)\n0x20 9 6\n")
    inclusive = callgrind_inclusive(dump)
    assert inclusive["main"] == 4 + 6
    assert inclusive["leaf"] == 6
