"""The rules of ids, refs and reasons: one text, used by the request schemas and by the
payment webhook alike."""

from __future__ import annotations

import re

#: Named limits on identifiers (bytes of UTF-8 are bounded by the body limit too).
MAX_USER_ID = 128
MAX_REF = 128
MAX_REASON = 256
MAX_ACTION = 64
#: No control characters (C0, DEL and C1) in ids, refs and reasons; ids and refs are not
#: blank either (a caller's bug, not a key).
CONTROL = "\x00-\x1f\x7f-\x9f"
#: The end of the text: Python's ``$`` alone also matches before a final newline
#: ("abc\n"); the spec's (ECMA) regexes read ``(?!\n)$`` the same.
END = r"(?!\n)$"
PRINTABLE_PATTERN = rf"^(?=.*\S)[^{CONTROL}]+{END}"

#: A user id holds no ':' either: it is the part of every Redis key of the user that ends
#: at the next ':' (lua.keys.Keys), so ids like "a" and "a:r:x" must not both be possible.
USER_ID_PATTERN = rf"^(?=.*\S)[^{CONTROL}:]+{END}"


def user_id_problem(user_id: object) -> str | None:
    """Why a user id given outside a JSON body (a path, a query, a payment's metadata) is
    not one, as UserId checks it in a body; None when it is fine."""
    if not isinstance(user_id, str) or not user_id:
        return "is required (a non-empty string)"
    if len(user_id) > MAX_USER_ID:
        return f"must be at most {MAX_USER_ID} characters"
    if re.match(USER_ID_PATTERN, user_id) is None:
        return "must not contain ':' or control characters, nor be blank"
    return None


#: What an action (seed 000's name of what a debit is for) and a meter may be called.
ACTION_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
METER_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")

