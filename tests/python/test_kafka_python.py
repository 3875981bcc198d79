"""kafka-python against a real strom process: admin, produce with every acks, consume, and
consumer groups with committed offsets."""
import os
import socket
import subprocess
import tempfile
import time
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewPartitions, NewTopic
from kafka.errors import UnknownTopicOrPartitionError
from kafka.structs import OffsetAndMetadata
import kafka.errors as Errors


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def broker():
    binary = os.environ["STROM_BIN"]
    port = _free_port()
    data = tempfile.mkdtemp(prefix="strom-py-")
    proc = subprocess.Popen(
        [
            binary, "server", "--listen", f"127.0.0.1:{port}", "--data-dir", data,
            "--set", "group.initial.rebalance.delay.ms=300",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "strom did not start"
            time.sleep(0.01)
    yield f"127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def _admin(broker):
    return KafkaAdminClient(bootstrap_servers=broker, request_timeout_ms=10000)


def test_admin_create_describe_grow_delete(broker):
    admin = _admin(broker)
    name = "py-admin-" + uuid.uuid4().hex[:6]
    admin.create_topics([NewTopic(name, 2, 1, topic_configs={"segment.bytes": "1048576"})])
    assert name in admin.list_topics()
    desc = admin.describe_topics([name])
    assert len(desc[0]["partitions"]) == 2
    configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
    entries = configs["topic"][name]
    assert entries["segment.bytes"]["value"] == "1048576"
    assert entries["segment.bytes"]["config_source"] == "DYNAMIC_TOPIC_CONFIG"
    # kafka-python lists only the settings that differ from their defaults.
    admin.create_partitions({name: NewPartitions(4)})
    assert len(admin.describe_topics([name])[0]["partitions"]) == 4
    admin.delete_topics([name])
    deadline = time.time() + 10
    while name in admin.list_topics():
        assert time.time() < deadline
        time.sleep(0.1)
    with pytest.raises(UnknownTopicOrPartitionError):
        admin.delete_topics([name])
    admin.close()


@pytest.mark.parametrize("acks", [0, 1, "all"])
def test_produce_and_consume(broker, acks):
    admin = _admin(broker)
    name = f"py-acks-{acks}-" + uuid.uuid4().hex[:6]
    admin.create_topics([NewTopic(name, 1, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=broker, acks=acks, linger_ms=2)
    sent = []
    for i in range(300):
        key, value = f"k{i}".encode(), f"v{i}".encode() * 3
        headers = [("h", str(i).encode()), ("h", b"again")]
        fut = producer.send(name, key=key, value=value, headers=headers, timestamp_ms=1_700_000_000_000 + i)
        sent.append((key, value, headers, 1_700_000_000_000 + i, fut))
    producer.flush(timeout=30)
    for i, (_, _, _, _, fut) in enumerate(sent):
        md = fut.get(timeout=10)
        if acks != 0:
            assert md.offset == i
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False, consumer_timeout_ms=10000)
    tp = TopicPartition(name, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    got = []
    for msg in consumer:
        got.append(msg)
        if len(got) == len(sent):
            break
    consumer.close()
    assert len(got) == len(sent)
    for i, (msg, (key, value, headers, ts, _)) in enumerate(zip(got, sent)):
        assert msg.offset == i
        assert msg.key == key and msg.value == value
        assert list(msg.headers) == headers
        assert msg.timestamp == ts


def test_end_offsets_and_seek(broker):
    name = "py-seek-" + uuid.uuid4().hex[:6]
    producer = KafkaProducer(bootstrap_servers=broker, acks="all")
    for i in range(20):
        producer.send(name, value=str(i).encode())
    producer.flush(timeout=30)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False, consumer_timeout_ms=10000)
    tp = TopicPartition(name, 0)
    assert consumer.end_offsets([tp])[tp] == 20
    assert consumer.beginning_offsets([tp])[tp] == 0
    consumer.assign([tp])
    consumer.seek(tp, 15)
    values = [m.value for m, _ in zip(consumer, range(5))]
    assert values == [b"15", b"16", b"17", b"18", b"19"]
    consumer.close()


def _error_name(e):
    """kafka-python reports per-group errors as a name, a class or an instance."""
    if e is None:
        return "NoError"
    if isinstance(e, str):
        return e
    return e.__name__ if isinstance(e, type) else type(e).__name__


def _poll_until(consumer, count, timeout_s):
    got = []
    deadline = time.time() + timeout_s
    while len(got) < count and time.time() < deadline:
        for recs in consumer.poll(timeout_ms=200).values():
            got.extend((r.partition, r.offset) for r in recs)
    return got


def test_group_consumer_auto_commit_resumes_and_admin_sees_the_group(broker):
    topic = "py-grp-" + uuid.uuid4().hex[:6]
    group = "pyg-" + uuid.uuid4().hex[:6]
    admin = _admin(broker)
    admin.create_topics([NewTopic(topic, 3, 1)])
    producer = KafkaProducer(bootstrap_servers=broker, acks="all")
    for i in range(30):
        producer.send(topic, value=b"v%d" % i, partition=i % 3)
    producer.flush()

    def group_consumer():
        c = KafkaConsumer(
            bootstrap_servers=broker,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=True,
            auto_commit_interval_ms=200,
        )
        c.subscribe([topic])
        return c

    c1 = group_consumer()
    first = _poll_until(c1, 30, 30)
    assert sorted(first) == sorted((i % 3, i // 3) for i in range(30))
    # While it is a member: listed and described as a stable consumer group.
    listed = admin.list_groups()
    assert any(g["group_id"] == group for g in listed), listed
    described = admin.describe_groups([group])[group]
    assert described["group_state"] == "Stable", described
    assert len(described["members"]) == 1
    c1.close()  # commits what it consumed

    offsets = admin.list_group_offsets({group: None})[group]
    assert {tp.partition: om.offset for tp, om in offsets.items()} == {0: 10, 1: 10, 2: 10}

    c2 = group_consumer()
    assert _poll_until(c2, 1, 4) == [], "nothing re-delivered after the commit"
    for i in range(30, 36):
        producer.send(topic, value=b"v%d" % i, partition=i % 3)
    producer.flush()
    second = _poll_until(c2, 6, 30)
    assert sorted(second) == [(0, 10), (0, 11), (1, 10), (1, 11), (2, 10), (2, 11)]

    # A member cannot be deleted from under; an empty group can.
    results = dict(admin.delete_groups([group]))
    assert _error_name(results[group]) == "NonEmptyGroupError", results
    c2.close()
    results = dict(admin.delete_groups([group, "no-such-group"]))
    assert _error_name(results[group]) in ("NoError", "OK"), results
    assert _error_name(results["no-such-group"]) == "GroupIdNotFoundError", results
    assert admin.list_group_offsets({group: None})[group] == {}


def test_oversized_offset_metadata_is_refused(broker):
    topic = "py-meta-" + uuid.uuid4().hex[:6]
    admin = _admin(broker)
    admin.create_topics([NewTopic(topic, 1, 1)])
    c = KafkaConsumer(bootstrap_servers=broker, group_id="pym-" + uuid.uuid4().hex[:6])
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    with pytest.raises(Errors.OffsetMetadataTooLargeError):
        c.commit({tp: OffsetAndMetadata(0, "x" * 5000, -1)})
    c.commit({tp: OffsetAndMetadata(0, "fine", -1)})
    assert c.committed(tp) == 0
    c.close()


def test_topic_configs_incremental_alter_and_reset(broker):
    admin = _admin(broker)
    name = "py-cfg-" + uuid.uuid4().hex[:6]
    admin.create_topics([NewTopic(name, 1, 1)])
    res = ConfigResource(ConfigResourceType.TOPIC, name, configs={"retention.ms": "12345"})
    admin.alter_configs([res])

    def value(key):
        described = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name)], config_filter="all"
        )
        return described["topic"][name][key]["value"]

    assert value("retention.ms") == "12345"
    bad = admin.alter_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name, configs={"retention.ms": "soon"})]
    )
    assert "InvalidConfigurationError" in str(bad) and "retention.ms" in str(bad), bad
    assert value("retention.ms") == "12345", "a refused change changes nothing"
    admin.reset_configs([ConfigResource(ConfigResourceType.TOPIC, name, configs={"retention.ms": None})])
    assert value("retention.ms") == "604800000"
