"""Pure logic, no network: amounts, calendar windows, ids, settings, queries, auth."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from core import refs
from core.amounts import MAX_UNITS, AmountError, format_micro, from_micro, to_micro
from core.clock import _TxIds, new_tx_id
from core.errors import Forbidden, Unauthorized
from core.settings import Caller, SettingsError, load_settings
from hotpath.auth import Authenticator
from lua.keys import Keys
from lua.periods import Calendar
from lua.resp import _PACKED_HEADERS_MAX, Batch
from lua.source import SCRIPTS
from persistence.plans import read_catalog_file
from persistence.queries import QUERIES, parse


def ms(*args: int, tz: object = UTC) -> int:
    return int(datetime(*args, tzinfo=tz).timestamp() * 1000)  # type: ignore[misc]


@pytest.mark.parametrize(("text", "micro"), [
    ("2", 2_000_000), ("2.0", 2_000_000), ("2.5", 2_500_000), ("0.000001", 1),
    ("2.500000000", 2_500_000), (str(MAX_UNITS), MAX_UNITS * 1_000_000),
    ("1E+3", 1_000_000_000), ("2.5" + "0" * 60, 2_500_000),
])
def test_amounts_accepted_exactly(text: str, micro: int) -> None:
    """Valid amounts convert to exact micro-units and back to the same decimal."""
    assert to_micro(Decimal(text)) == micro
    assert from_micro(micro) == Decimal(text)


@pytest.mark.parametrize("text", [
    "0", "-1", "0.0000001", "NaN", "Infinity", "-Infinity", "1E+400", str(MAX_UNITS + 1),
    "sNaN",
    # Past Decimal's 28-digit context: normalize() would round these to 1 and accept them.
    "1.0000000000000000000000000000001", "0.99999999999999999999999999999",
])
def test_amounts_rejected(text: str) -> None:
    """Zero, negatives, NaN, infinities, too many decimals and absurd sizes are refused."""
    with pytest.raises(AmountError):
        to_micro(Decimal(text))


def test_amount_formatting() -> None:
    """Micro-units print as plain decimals, signed, without trailing zeros."""
    assert format_micro(-2_500_000) == "-2.5"
    assert format_micro(3) == "0.000003"
    assert str(from_micro(300_000)) == "0.3"


def test_day_and_month_windows_in_a_time_zone() -> None:
    """Moscow's day starts at 21:00 UTC the day before; months follow local dates."""
    cal = Calendar("Europe/Moscow")
    w = cal.compute(ms(2026, 11, 30, 21, 30))  # 00:30 on 1 December in Moscow
    assert (w.day_id, w.month_id) == ("2026-12-01", "2026-12")
    assert w.day_start_ms == ms(2026, 11, 30, 21, 0)
    assert w.month_end_ms == ms(2026, 12, 31, 21, 0)
    assert w.contains(ms(2026, 11, 30, 21, 30)) and not w.contains(ms(2026, 12, 1, 21, 0))


def test_windows_across_daylight_saving_are_23_hours() -> None:
    """A DST change makes a 23-hour day; the window follows local midnights."""
    w = Calendar("Europe/Berlin").compute(ms(2026, 3, 29, 12, 0))
    assert w.day_end_ms - w.day_start_ms == 23 * 3_600_000


def test_calendar_cache_recomputes_after_the_boundary() -> None:
    """The cached windows are reused inside the day and replaced after it."""
    cal = Calendar("UTC")
    first = cal.windows(ms(2026, 11, 23, 1, 0))
    assert cal.windows(ms(2026, 11, 23, 23, 59)) is first
    assert cal.windows(ms(2026, 11, 24, 0, 0)).day_id == "2026-11-24"


def test_tx_ids_are_uuid7_time_ordered_and_unique() -> None:
    """Ids carry the millisecond first, version 7, and do not repeat."""
    ids = [new_tx_id(1_700_000_000_000 + i // 10) for i in range(1000)]
    assert len(set(ids)) == 1000
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 for u in parsed)
    assert [u.int >> 80 for u in parsed] == sorted(u.int >> 80 for u in parsed)


def test_tx_ids_stay_unique_when_the_clock_steps_back() -> None:
    """16,384 ids after a millisecond, the counter is where it was then: a clock stepped
    back to that millisecond would have made the same id (a flushed debit would then be
    skipped as a duplicate of another)."""
    ids = _TxIds()
    first = ids.new(1_000)
    later = [ids.new(1_001) for _ in range(16_383)]
    again = ids.new(1_000)  # the clock went back one millisecond
    assert again != first and len({first, again, *later}) == 16_385
    assert uuid.UUID(again).version == 7 and again[:13] == first[:13]  # it carries that ms


def test_tx_ids_of_two_processes_differ_in_the_same_millisecond() -> None:
    """Each process draws its own random bits (again after a fork), so two generators
    asked in the same millisecond never meet; the variant bits stay RFC 9562's."""
    one, two = _TxIds(), _TxIds()
    ids = [g.new(1_700_000_000_000) for g in (one, two) for _ in range(100)]
    assert len(set(ids)) == 200
    assert all(uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    before = one.suffix
    one.reseed()
    assert one.suffix != before


def test_keys_share_one_hash_tag_per_user() -> None:
    """Every key of a user carries the same {shard} tag; the shard is crc32 mod N."""
    keys = Keys("qg", 256)
    cal = Calendar("UTC").compute(ms(2026, 11, 23))
    built = keys.debit_keys("user-1", "chat", cal)
    tags = {k[k.index("{") : k.index("}") + 1] for k in built}
    assert len(tags) == 1
    assert built[3].endswith(":c:chat:d:2026-11-23") and built[4].endswith(":c:chat:m:2026-11")
    assert built[0] == keys.user("user-1") and built[5] == keys.ledger(keys.shard("user-1"))


def test_db_dsn_takes_the_seeds_sqlalchemy_form() -> None:
    """The seed writes DB_DSN=postgresql+asyncpg://...; asyncpg wants postgresql://; a DSN
    of another database is refused at start-up, naming DB_DSN."""
    seed = load_settings({"DB_DSN": "postgresql+asyncpg://billing_user:pw@db:5456/billing_db"})
    assert seed.db_dsn == "postgresql://billing_user:pw@db:5456/billing_db"
    assert load_settings({"DB_DSN": "postgres://u@h/d"}).db_dsn == "postgresql://u@h/d"
    for bad in ("mysql://u@h/d", "host=h dbname=d"):
        with pytest.raises(SettingsError, match="DB_DSN"):
            load_settings({"DB_DSN": bad})


def test_counter_keys_parse_back_to_user_meter_and_period() -> None:
    """The report reads counters back from their keys: every counter key parses to what
    built it; other keys of the user do not parse as counters."""
    keys = Keys("qg", 256)
    windows = Calendar("UTC").windows(1_763_899_200_000)
    day, month = keys.counters("user-1", "chat", windows)
    assert keys.parse_counter(day) == ("user-1", "chat", f"d:{windows.day_id}")
    assert keys.parse_counter(month) == ("user-1", "chat", f"m:{windows.month_id}")
    assert keys.parse_counter(keys.ref_bucket("user-1", 20450)) is None
    assert keys.parse_counter(keys.user("user-1")) is None
    assert keys.user_of(keys.user("user-1")) == "user-1"


def test_settings_refuse_development_shortcuts_in_production() -> None:
    """ENV=production stops on the dev token or without real servers, naming the variable."""
    with pytest.raises(SettingsError, match="SERVICE_TOKEN"):
        load_settings({"ENV": "production", "REDIS_URL": "redis://x", "DB_DSN": "postgresql://x"})
    with pytest.raises(SettingsError, match="REDIS_URL"):
        load_settings({"ENV": "production", "SERVICE_TOKEN": "a-long-production-token"})
    real = {"ENV": "production", "SERVICE_TOKEN": "a-long-production-token",
            "REDIS_URL": "redis://x", "DB_DSN": "postgresql://x"}
    with pytest.raises(SettingsError, match="WEBHOOK_PUBLIC_KEY"):
        load_settings(real)
    with pytest.raises(SettingsError, match="YOOKASSA_SHOP_ID"):
        load_settings(real | {"WEBHOOK_VERIFIER": "yookassa"})
    assert load_settings(real | {"WEBHOOK_PUBLIC_KEY": "/etc/keys/pay.pem"}).production
    with pytest.raises(SettingsError, match="WEBHOOK_VERIFIER"):
        load_settings({"WEBHOOK_VERIFIER": "trust-me"})
    with pytest.raises(SettingsError, match="TRUSTED_PROXIES"):
        load_settings({"TRUSTED_PROXIES": "10.0.0.0/8, not-an-address"})
    with pytest.raises(SettingsError, match="TIMEZONE"):
        load_settings({"TIMEZONE": "Mars/Olympus"})
    with pytest.raises(SettingsError, match="PORT"):
        load_settings({"PORT": "eighty"})
    ok = load_settings({"CALLER_KEYS": '{"chat-svc": {"key": "chat-key-0123456789", '
                                       '"scopes": ["debit", "read"]}}'})
    assert ok.callers[0].scopes == frozenset({"debit", "read"})
    with pytest.raises(SettingsError, match=r"CALLER_KEYS\['chat\\x1fsvc'\]\.name"):
        load_settings({"CALLER_KEYS": '{"chat\\u001fsvc": {"key": "chat-key-0123456789"}}'})


def test_authenticator_names_callers_and_checks_scopes() -> None:
    """A known key yields its caller; an unknown or missing one is 401; scopes are enforced."""
    auth = Authenticator((Caller("chat", "k" * 20, frozenset({"debit"})),))
    caller = auth.authenticate("k" * 20)
    assert caller.name == "chat"
    auth.require(caller, "debit")
    with pytest.raises(Forbidden):
        auth.require(caller, "plans")
    for bad in (None, "", "k" * 19):
        with pytest.raises(Unauthorized):
            auth.authenticate(bad)


def test_authenticator_compares_every_key_in_constant_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever key comes (the first caller's, the last's, a wrong one, a short or a long
    one), it is compared with every known key, by hmac.compare_digest, as digests of one
    length: the time taken tells nothing about which key matched or how much of it."""
    import hotpath.auth

    compared: list[tuple[int, int]] = []
    real = hotpath.auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    callers = tuple(Caller(f"svc{i}", f"key-{i}-" + "x" * 20, frozenset({"debit"}))
                    for i in range(3))
    auth = Authenticator(callers)
    monkeypatch.setattr(hotpath.auth.hmac, "compare_digest", spy)
    for key, name in ((callers[0].key, "svc0"), (callers[2].key, "svc2"),
                      ("wrong", None), ("w" * 5000, None)):
        compared.clear()
        if name is None:
            with pytest.raises(Unauthorized):
                auth.authenticate(key)
        else:
            assert auth.authenticate(key).name == name
        assert compared == [(32, 32)] * 3, key[:20]


def test_queries_file_parses_and_names_every_statement() -> None:
    """Each statement has a name and SQL; duplicates and empty bodies are refused."""
    assert "flush_events" in QUERIES and QUERIES["ping"].startswith("SELECT")
    with pytest.raises(ValueError, match="twice"):
        parse("-- name: a --\nSELECT 1;\n-- name: a --\nSELECT 2;\n")
    with pytest.raises(ValueError, match="no SQL"):
        parse("-- name: a --\n-- only a comment\n")


def test_catalog_file_has_the_required_plans() -> None:
    """free, base750 (750 units a cycle of its 30 days) and pro_month (10000 chat, 200
    template a cycle); free keeps calendar days."""
    plans = {p.plan_code: p for p in read_catalog_file()}
    assert plans["base750"].meters["units"].limit_micro == 750_000_000
    assert plans["base750"].meters["units"].period == "cycle"
    assert plans["pro_month"].meters["chat"].period == "cycle"
    assert plans["free"].meters["chat"].period == "day"
    assert plans["pro_month"].meters["chat"].limit_micro == 10_000_000_000
    assert plans["pro_month"].meters["template"].limit_micro == 200_000_000
    assert "free" in plans


def test_stream_events_are_checked_when_read() -> None:
    """A well-formed entry decodes; a wrong layout, kind or split goes to poison (BadEvent)."""
    from core.events import BadEvent, decode

    tx = new_tx_id()
    values = ["v1", "debit", tx, "u1", "chat", "-2500000", "2000000", "500000", "d:2026-11-23",
              "ref-1", "", "chat-svc", "chat_tokens", "free", "1763899200000"]
    event = decode(3, "1-0", {"e": "\x1f".join(values)})
    assert (event.amount, event.from_allowance, event.from_credits) == (-2_500_000, 2_000_000,
                                                                       500_000)
    assert event.reason is None and event.caller == "chat-svc" and event.shard == 3
    assert event.remaining is None  # written before debits recorded what they left
    event = decode(3, "1-0", {"e": "\x1f".join([*values, "7500000"])})
    assert event.remaining == 7_500_000
    broken = [
        {"e": "\x1f".join(values[:-1])},
        {"e": "\x1f".join([*values, "7500000", "extra"])},
        {"e": "\x1f".join([*values, "-1"])},
        {"e": "\x1f".join(["v1", "gift", *values[2:]])},
        {"e": "\x1f".join([*values[:5], "-2500001", *values[6:]])},
        {"e": "\x1f".join([*values[:2], "not-a-uuid", *values[3:]])},
        {"k": "debit"},
    ]
    for fields in broken:
        with pytest.raises(BadEvent):
            decode(3, "1-0", fields)


def test_v2_debit_events_read_as_their_v1_twins() -> None:
    """The hot path's head (debit_event_head) plus the script's tail decodes to the event a
    v1 entry with the same values gives; a v2 entry of another kind or length is poison."""
    from core.events import BadEvent, debit_event_head, decode

    tx = new_tx_id()
    head = debit_event_head(tx, "u1", "chat", 2_500_000, "ref-1", "", "chat-svc",
                            "chat_tokens")
    tail = ["2000000", "500000", "d:2026-11-23", "free", "1763899200000", "7500000"]
    v2 = decode(3, "1-0", {"e": "\x1f".join([head, *tail])})
    v1 = decode(3, "1-0", {"e": "\x1f".join([
        "v1", "debit", tx, "u1", "chat", "-2500000", "2000000", "500000", "d:2026-11-23",
        "ref-1", "", "chat-svc", "chat_tokens", "free", "1763899200000", "7500000"])})
    assert v2 == v1 and v2.remaining == 7_500_000 and v2.ref == "ref-1"
    for fields in ({"e": "\x1f".join([head, *tail[:-1]])},
                   {"e": "\x1f".join([head.replace("debit", "credit", 1), *tail])}):
        with pytest.raises(BadEvent):
            decode(3, "1-0", fields)


@pytest.mark.parametrize("items", [1, 2, 14, 32])
def test_a_batch_packs_to_the_same_bytes_as_hiredis(items: int) -> None:
    """The batch call is packed from pre-packed parts (a cached header): byte for byte
    the command hiredis packs, non-ASCII and empty arguments included, and EVAL after
    NOSCRIPT; more distinct headers than the cache holds change nothing."""
    import hiredis

    script = SCRIPTS["debit_many"]
    for h in range(_PACKED_HEADERS_MAX + 2):
        header = (h, "2026-11-23", 1_763_856_000_000, 1_763_942_400_000, "2026-11",
                  1_761_955_200_000, 1_764_547_200_000, 604_800_000, 86_400, 3_600_000,
                  1_000_000, "free")
        batch = Batch(script, header)
        for i in range(items):
            batch.item_keys.extend(f"qg:{{{i:03d}}}:k{j}:пользователь" for j in range(6))
            batch.item_args.extend([f"u{i}", "chat", 10**6 + i, f"ref-{i}", "chat:1:", "",
                                    "caller", "tx", "чат"])
        for evaled in (False, True):
            batch.evaled = evaled
            head = ("EVAL", script.source) if evaled else ("EVALSHA", script.sha)
            assert batch.pack() == hiredis.pack_command((
                *head, 6 * items, *batch.item_keys, *header, *batch.item_args))


def test_a_stale_pid_file_naming_another_program_is_left_alone(tmp_path: Path) -> None:
    """A pid file that outlived a reboot may name an unrelated process by now: the stale
    server check signals only a process running the server's program."""
    import subprocess
    import sys

    from ops.devservers import _stop_stale

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pid_file = tmp_path / "redis.pid"
        pid_file.write_text(f"{other.pid}\n")
        _stop_stale(pid_file, "Redis", "redis-server", 15)
        assert other.poll() is None  # still running: not ours to stop
    finally:
        other.kill()
        other.wait()


def test_idempotency_records_give_back_the_tx_and_hold_ids() -> None:
    """A debit's tx id comes back from its 8-byte record id and the (user, ref) hash; a tx
    id of another (user, ref) or of another making is kept whole (16 bytes); a hold id from
    its 16 random bytes and its tail."""
    h = refs.ref_hash("user-1", "ref-1")
    tx, rid = refs.debit_tx(h, 1_763_899_200_123)
    assert len(rid) == 8 and refs.tx_of(h, rid) == tx and refs.record_id(h, tx) == rid
    assert uuid.UUID(tx).version == 7 and uuid.UUID(tx).bytes[:6] == rid[:6]
    other = refs.ref_hash("user-1", "ref-2")
    assert refs.record_id(other, tx) == uuid.UUID(tx).bytes
    old = str(uuid.uuid4())
    assert refs.tx_of(h, refs.record_id(h, old)) == old
    twice = {refs.debit_tx(h, 1_763_899_200_123)[0] for _ in range(100)}
    assert len(twice) == 100  # one ref, one ms: still new ids (the counter)
    hold_id = f"{uuid.uuid4().hex}.dXNlci0x"
    record = refs.hold_record("user-1", "ref-1", hold_id, "chat", 5, "")
    assert refs.hold_of(record[16:], "dXNlci0x") == hold_id
    assert refs.fingerprint("chat", 5, "") != refs.hold_fingerprint("chat", 5, "")


def test_record_id_is_short_exactly_for_a_debit_tx_of_its_own_ref() -> None:
    """record_id reads a ledger tx id by its bytes (no UUID parsing on the load path): 8
    bytes exactly when _tx_bytes would rebuild the same UUID from (user, ref), else 16."""
    import uuid as uuid_module

    from core import refs

    for i in range(2000):
        h = refs.ref_hash(f"user-{i}", f"ref-{i}")
        own, short = refs.debit_tx(h, now_ms=1_764_900_000_000 + i)
        other = refs.debit_tx(refs.ref_hash(f"user-{i}", "another"))[0]
        for spelled in (own, own.upper(), own.replace("-", ""), "{" + own + "}"):
            assert refs.record_id(h, spelled) == short
            assert refs.tx_of(h, short) == own
        for foreign in (other, str(uuid_module.uuid4()), str(uuid_module.uuid1())):
            assert refs.record_id(h, foreign) == uuid_module.UUID(foreign).bytes
