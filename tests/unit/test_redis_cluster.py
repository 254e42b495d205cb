"""Redis Cluster: slots as Redis computes them, cluster URLs (checked at load with file, line
and key), relaylab.resp's cluster mode against a real 3-master cluster (routing by slot,
MOVED, ASK, scripts by their first key) and the redis-py factory."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster

from logd.redisconn import SyncClusterResp, sync_resp
from relaylab import resp as resp_module
from relaylab.devstack.redis import RedisCluster
from relaylab.limits.lua import Script
from relaylab.policy.loader import ConfigError, load_policy
from relaylab.redisclient import async_client, sync_client
from relaylab.resp import (
    ClusterAddress,
    ClusterRespClient,
    RedisReplyError,
    RespClient,
    command_key,
    crc16,
    encode_args,
    encode_command,
    key_slot,
    resp_client,
)
from relaylab.suppression.decide import Verdict
from relaylab.suppression.keys import list_key, queue_key
from relaylab.suppression.model import GLOBAL, Entry, Kind, ListKind, Reason, Source
from relaylab.suppression.store import lookup_pipelined


def test_crc16_matches_the_redis_cluster_spec_vector() -> None:
    assert crc16(b"123456789") == 0x31C3


@pytest.mark.parametrize(("key", "slot"), [
    ("foo", 12182),  # CLUSTER KEYSLOT foo
    ("{user1000}.following", key_slot("user1000")),
    ("foo{}{bar}", crc16(b"foo{}{bar}") % 16384),  # empty tag: the whole key
    ("foo{{bar}}zap", key_slot("{bar")),  # the tag ends at the first "}"
    ("foo{bar}{zap}", key_slot("bar")),  # only the first tag counts
])
def test_key_slot_follows_the_hash_tag_rules(key: str, slot: int) -> None:
    assert key_slot(key) == slot


def test_keys_of_one_subaccount_share_a_slot_and_global_lists_have_their_own() -> None:
    sub = {key_slot(list_key("shop", w)) for w in ListKind}
    glob = {key_slot(list_key(GLOBAL, w)) for w in ListKind}
    assert len(sub) == 1 and len(glob) == 1 and sub != glob
    assert key_slot(queue_key("3FA2B1C00D")) == key_slot(queue_key("ABCDE12345"))


@pytest.mark.parametrize(("args", "key"), [
    (["GET", "k1"], b"k1"),
    (["hmget", "rl:{x}:bl", "a", "b"], b"rl:{x}:bl"),
    (["EVALSHA", "0" * 40, "2", "first", "second", "arg"], b"first"),
    (["EVAL", "return 1", "0", "arg"], None),
    (["PING"], None),
    (["CLUSTER", "SLOTS"], None),
])
def test_command_key_is_the_first_key_scripts_included(args: list[str], key: bytes | None) -> None:
    assert command_key(encode_command(args)) == key


@pytest.mark.parametrize(("url", "expected"), [
    ("redis+cluster://h1:7000,h2:7001", ClusterAddress((("h1", 7000), ("h2", 7001)))),
    ("redis+cluster://u:p%40w@h1:7000/0", ClusterAddress((("h1", 7000),), "u", "p@w")),
    ("redis+cluster://:pw@h1:7000", ClusterAddress((("h1", 7000),), None, "pw")),
    ("rediss+cluster://h1:7000", ClusterAddress((("h1", 7000),), tls=True)),
])
def test_cluster_url(url: str, expected: ClusterAddress) -> None:
    assert ClusterAddress.parse(url) == expected


@pytest.mark.parametrize(("url", "message"), [
    ("redis+cluster://h1:7000/3", "only database 0"),
    ("redis+cluster://h1,h2:7000", "'h1' is not host:port"),
    ("redis+cluster://h1:99999", "'h1:99999' is not host:port"),
])
def test_bad_cluster_url_is_a_config_error_with_file_line_and_key(tmp_path: Path, url: str,
                                                                   message: str) -> None:
    path = tmp_path / "relaylab.yaml"
    path.write_text(f"subaccounts: {{}}\nredis:\n  url: {url}\n")
    with pytest.raises(ConfigError) as e:
        load_policy(path, check_keys=False)
    [p] = e.value.problems
    assert (p.file, p.line, p.key) == (path, 3, "redis.url")
    assert message in p.message


def test_cluster_url_is_accepted_at_load(tmp_path: Path) -> None:
    path = tmp_path / "relaylab.yaml"
    path.write_text("subaccounts: {}\nredis:\n  url: redis+cluster://10.0.0.1:7000,10.0.0.2:7000\n")
    assert load_policy(path, check_keys=False).redis_url == \
        "redis+cluster://10.0.0.1:7000,10.0.0.2:7000"


# --- against a real cluster -----------------------------------------------------------


@pytest.fixture
def cluster(redis_cluster: RedisCluster) -> Iterator[RedisCluster]:
    for port in redis_cluster.ports:
        redis.Redis(port=port).flushall()
    yield redis_cluster


def _owner_port(c: RedisCluster, key: str) -> int:
    r = redis.Redis(port=c.ports[0])
    for start, end, master, *_ in r.execute_command("CLUSTER SLOTS"):
        if start <= key_slot(key) <= end:
            return int(master[1])
    raise AssertionError("slot not served")


def _keys_on_distinct_nodes(c: RedisCluster) -> list[str]:
    by_port: dict[int, str] = {}
    for i in range(100):
        by_port.setdefault(_owner_port(c, f"k{i}"), f"k{i}")
    assert len(by_port) == 3
    return list(by_port.values())


SCRIPT = Script("two_keys", "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[2])")


def test_resp_client_routes_each_command_to_its_slots_node(cluster: RedisCluster) -> None:
    keys = _keys_on_distinct_nodes(cluster)

    async def go() -> list[object]:
        c = resp_client(cluster.url, scripts=(SCRIPT,))
        assert isinstance(c, ClusterRespClient)
        try:
            await c.execute_all([encode_command(["SET", k, k.upper()]) for k in keys])
            got = await c.execute_all([encode_command(["GET", k]) for k in keys])
            # a script by its first key; both keys in one slot (one hash tag)
            prefix = c.script_prefix(SCRIPT, ["{t}a", "{t}a"], [])
            fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            c.evalsha(prefix, ["v"], fut.set_result)
            return [*got, await fut]
        finally:
            await c.close()

    assert asyncio.run(go()) == [k.upper().encode() for k in keys] + [b"v"]
    for k in keys:  # each key really lives on the node that owns its slot
        assert redis.Redis(port=_owner_port(cluster, k)).get(k) == k.upper().encode()


def test_execute_all_with_keys_routes_by_the_given_keys_without_parsing_the_commands(
        cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The suppression lookup's way: each command's key given, its slot remembered; the
    commands are not parsed, and a wrong key shows as a MOVED redirect."""
    keys = _keys_on_distinct_nodes(cluster)

    def no_parsing(command: bytes) -> int | None:
        raise AssertionError(f"command parsed: {command!r}")

    async def go() -> tuple[list[object], int, object, int]:
        c = resp_client(cluster.url)
        assert isinstance(c, ClusterRespClient)
        try:
            await c.execute_all([encode_command(["SET", k, k.upper()]) for k in keys])
            monkeypatch.setattr(resp_module, "command_slot", no_parsing)
            before = c.redirects
            got = await c.execute_all([encode_command(["GET", k]) for k in keys], keys)
            routed = c.redirects - before
            monkeypatch.undo()  # following a redirection reads the command's slot
            # the key of another node: the command goes there and is MOVED to its owner
            wrong = await c.execute_all([encode_command(["GET", keys[0]])], [keys[1]])
            return got, routed, wrong[0], c.redirects - before
        finally:
            await c.close()

    got, routed, wrong, redirects = asyncio.run(go())
    assert got == [k.upper().encode() for k in keys]
    assert routed == 0
    assert wrong == keys[0].upper().encode() and redirects == 1


def test_script_with_keys_of_two_slots_is_refused_by_the_cluster(cluster: RedisCluster) -> None:
    async def go() -> object:
        c = resp_client(cluster.url, scripts=(SCRIPT,))
        try:
            return await c.execute("EVAL", SCRIPT.body, "2", "{a}x", "{b}x", "v")
        except RedisReplyError as e:
            return e
        finally:
            await c.close()

    assert str(asyncio.run(go())).startswith("CROSSSLOT")


def test_resp_client_follows_moved_and_corrects_its_slot_map(cluster: RedisCluster) -> None:
    key = "moved-key"
    owner = _owner_port(cluster, key)
    wrong = next(p for p in cluster.ports if p != owner)

    async def go() -> tuple[object, int]:
        c = resp_client(cluster.url)
        assert isinstance(c, ClusterRespClient)
        try:
            await c.execute("SET", key, "1")
            c._slots = [c.node("127.0.0.1", wrong)] * len(c._slots)  # a stale map
            v = await c.execute("GET", key)
            assert c.redirects == 1
            await c.refresh()
            fixed = c._slots[key_slot(key)]
            return v, fixed.address.port if isinstance(fixed, RespClient) else -1
        finally:
            await c.close()

    assert asyncio.run(go()) == (b"1", owner)


def test_resp_client_follows_ask_during_a_slot_migration(cluster: RedisCluster) -> None:
    key = "ask-key"
    slot = key_slot(key)
    source = redis.Redis(port=_owner_port(cluster, key))
    target_port = next(p for p in cluster.ports if p != _owner_port(cluster, key))
    target = redis.Redis(port=target_port)
    source_id = source.execute_command("CLUSTER MYID").decode()
    target_id = target.execute_command("CLUSTER MYID").decode()
    target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
    source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
    try:
        async def go() -> object:
            c = resp_client(cluster.url)
            try:  # the key is not on the source: it answers ASK, the target takes it
                await c.execute("SET", key, "asked")
                return await c.execute("GET", key)
            finally:
                await c.close()

        assert asyncio.run(go()) == b"asked"
        target.execute_command("ASKING")
        assert target.get(key) == b"asked" and source.execute_command("DBSIZE") == 0
    finally:
        for r in (source, target):
            r.execute_command("CLUSTER SETSLOT", slot, "NODE", source_id)


def test_redis_py_factory_gives_a_cluster_client_for_a_cluster_url(cluster: RedisCluster) -> None:
    keys = _keys_on_distinct_nodes(cluster)
    r = sync_client(cluster.url, socket_timeout=5, socket_connect_timeout=5)
    assert isinstance(r, redis.cluster.RedisCluster)
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.set(k, "x")
    pipe.execute()
    assert [redis.Redis(port=_owner_port(cluster, k)).get(k) for k in keys] == [b"x"] * 3

    async def go() -> object:
        a = async_client(cluster.url, 5.0, decode_responses=True)
        try:
            return await a.get(keys[0])
        finally:
            await a.aclose()

    assert asyncio.run(go()) == "x"


def test_resp_client_is_plain_for_a_plain_url() -> None:
    assert type(resp_client("redis://127.0.0.1:1/0")) is RespClient




def test_logd_connection_sends_a_batch_to_every_slots_node_and_follows_moved(
        cluster: RedisCluster) -> None:
    keys = _keys_on_distinct_nodes(cluster)
    conn = sync_resp(cluster.url)
    assert isinstance(conn, SyncClusterResp)
    try:
        assert conn.execute_all([encode_command(["SET", k, k]) for k in keys]) == ["OK"] * 3
        # a stale map: every slot at one node; the others answer MOVED, which is followed
        conn._slots = [conn.node("127.0.0.1", cluster.ports[0])] * len(conn._slots)
        assert conn.execute_all([encode_command(["GET", k]) for k in keys]) == \
            [k.encode() for k in keys]
        assert conn.execute("GET", keys[1]) == keys[1].encode()  # the map was read again
        assert not conn._sent
    finally:
        conn.close()


def test_evalsha_head_routes_by_the_key_in_the_head_or_in_the_rest(cluster: RedisCluster) -> None:
    keys = _keys_on_distinct_nodes(cluster)
    script = Script("set_one", "return redis.call('SET', KEYS[1], ARGV[1])")

    async def go() -> list[object]:
        c = resp_client(cluster.url, scripts=(script,))
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[object]] = []
        try:
            for k in keys:  # policyd's way: the keys in the head (kept per subaccount)
                for _ in range(2):
                    head, eval_head = c.script_prefix(script, [k], []).heads(1)
                    futures.append(loop.create_future())
                    c.evalsha_head(head, eval_head, encode_args(["head"]), futures[-1].set_result)
            for k in keys:  # the tracker's way: the head ends before the number of keys
                n = b"*5\r\n"
                futures.append(loop.create_future())
                c.evalsha_head(n + encode_args(["EVALSHA", script.sha]),
                               n + encode_args(["EVAL", script.body]),
                               encode_args(["1", k, "rest"]), futures[-1].set_result)
            replies = list(await asyncio.gather(*futures))
            assert isinstance(c, ClusterRespClient) and c.redirects == 0  # each to its node
            return replies
        finally:
            await c.close()

    assert asyncio.run(go()) == ["OK"] * 9
    assert [redis.Redis(port=_owner_port(cluster, k)).get(k) for k in keys] == [b"rest"] * 3


def test_suppression_lookup_reads_each_slot_in_one_write_to_its_node(
        cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The RCPT check reads the subaccount's lists and the global lists: two slots, so one
    write to each slot's node, both sent before either reply is awaited."""
    sub_bl, glob_bl = list_key("shop", ListKind.BLACKLIST), list_key(GLOBAL, ListKind.BLACKLIST)
    if _owner_port(cluster, sub_bl) == _owner_port(cluster, glob_bl):
        pytest.fail("the test needs the two slots on two nodes")
    now = 1_800_000_000
    r = sync_client(cluster.url, socket_timeout=5, socket_connect_timeout=5)
    r.hset(glob_bl, "d:spam.example",
           Entry("spam.example", Kind.DOMAIN, Reason.SPAM_COMPLAINT, Source.CLI, now, "").to_bytes())
    r.hset(sub_bl, "a:bob@example.com",
           Entry("bob@example.com", Kind.ADDRESS, Reason.HARDBOUNCE, Source.CLI, now, "").to_bytes())
    writes: list[int] = []
    real_flush = resp_module._Connection._flush

    def counting(self: Any) -> None:
        if self._out:
            writes.append(id(self))
        real_flush(self)

    async def go() -> list[Verdict]:
        c = resp_client(cluster.url)
        try:
            await lookup_pipelined(c, "shop", "warm@example.org", now=now)  # connect first
            monkeypatch.setattr(resp_module._Connection, "_flush", counting)
            return [await lookup_pipelined(c, "shop", rcpt, now=now)
                    for rcpt in ("bob@example.com", "eve@spam.example", "ok@example.org")]
        finally:
            await c.close()

    bob, eve, ok = asyncio.run(go())
    assert bob.refuse and not bob.global_list
    assert eve.refuse and eve.global_list
    assert not ok.refuse
    assert len(writes) == 6 and all(writes[i] != writes[i + 1] for i in (0, 2, 4))
