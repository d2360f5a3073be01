"""The Redis side: the scripts (one ``.lua`` file per operation, each behind a named
wrapper in ``lua.scripts``), the key layout (``lua.keys``), the calendar periods, the
hot path's pipelined client (``lua.connection``) and the instance check (``lua.instance``).
"""
