"""The scripts' sources: one ``.lua`` file per operation plus the shared prelude, read once
from the package and called by SHA1 (EVALSHA, with the source sent again on NOSCRIPT)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True, slots=True)
class Script:
    """One registered script: its name, full source (prelude included) and SHA1."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> Script:
        """Read ``<name>.lua`` and the shared prelude from the package."""
        folder = resources.files(__package__)
        source = "\n".join((folder / f).read_text(encoding="utf-8")
                           for f in ("_common.lua", f"{name}.lua"))
        return cls(name, source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


#: One script per operation; "debit_many" is the hot path's debits, one or a batch of
#: them per call (see lua/connection.py).
SCRIPTS: dict[str, Script] = {
    name: Script.load(name)
    for name in ("debit_many", "check_many", "load_user", "restore_refs", "load_catalog",
                 "set_plan", "apply_payment", "ledger_lag", "reserve", "settle", "extend",
                 "expire_holds", "ack_many")
}
