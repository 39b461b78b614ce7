"""Prometheus metrics, read from the shared status table.

:class:`StatusCollector` is a ``prometheus_client`` collector: at each scrape it reads
the status table (as ``status`` does: no signal, no waiting on any process) and yields
one sample per worker process, labelled ``worker`` (name), ``worker_id`` and ``pid``.
prometheus_client writes the exposition format; nothing here formats text by hand.

=======================================  ==========  ==================================
metric                                   type        ``status`` column
=======================================  ==========  ==================================
``longshore_connections``                gauge       connections
``longshore_send_buffer_bytes``          gauge       send_buffer_bytes
``longshore_memory_bytes``               gauge       memory (RSS)
``longshore_qps``                        gauge       qps (last second)
``longshore_timers``                     gauge       timers
``longshore_busy``                       gauge       status (1: busy)
``longshore_busy_seconds``               gauge       busy_for
``longshore_process_start_time_seconds`` gauge       started_at
``longshore_requests_total``             counter     total_request
``longshore_send_fail_total``            counter     send_fail
``longshore_exceptions_total``           counter     throw_exception
``longshore_protocol_errors_total``      counter     protocol_error
``longshore_package_too_large_total``    counter     package_too_large
``longshore_connect_fail_total``         counter     connect_fail
``longshore_tls_errors_total``           counter     tls_error
``longshore_bytes_read_total``           counter     bytes_read
``longshore_bytes_written_total``        counter     bytes_written
``longshore_channel_messages_total``     counter     channel (label ``kind``: published,
                                                     delivered, dropped)
``longshore_worker_exits_total``         counter     exits (labels ``worker``, ``status``)
``longshore_master_memory_bytes``        gauge       master memory
``longshore_master_start_time_seconds``  gauge       master start time
=======================================  ==========  ==================================

The counters of one process start at zero and only grow; a respawned or reloaded
process has a new ``pid`` label, so its series starts afresh. A process being forked
(its slot claimed, its pid not yet recorded) is left out. The ``pid`` label keeps the
series of two Workers with the same name apart.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .stats import StatsTable
from .status import collect

PROCESS_LABELS = ["worker", "worker_id", "pid"]

#: (metric name, status field, help text) of the per-process gauges ...
GAUGES = (
    ("longshore_connections", "connections", "Open connections of the process."),
    ("longshore_send_buffer_bytes", "send_buffer_bytes", "Bytes waiting in the send buffers of the process."),
    ("longshore_memory_bytes", "memory", "Resident memory of the process."),
    ("longshore_qps", "qps", "Requests per second over the last second."),
    ("longshore_timers", "timers", "Timers of the process."),
    ("longshore_busy_seconds", "busy_for", "How long the process has been stuck in user code (0: idle)."),
    ("longshore_process_start_time_seconds", "started_at", "When the process started (Unix time)."),
)
#: ... and counters (prometheus_client adds ``_total``).
COUNTERS = (
    ("longshore_requests", "total_request", "Messages (requests) handled by the process."),
    ("longshore_send_fail", "send_fail", "send() calls that failed: connection closed, or send buffer full."),
    ("longshore_exceptions", "throw_exception", "Exceptions raised by callbacks."),
    ("longshore_protocol_errors", "protocol_error", "Connections closed for invalid input."),
    ("longshore_package_too_large", "package_too_large", "Connections closed for a package over max_package_size."),
    ("longshore_connect_fail", "connect_fail", "Outgoing connections that failed."),
    ("longshore_tls_errors", "tls_error", "TLS handshakes that failed (plain-text clients included)."),
    ("longshore_bytes_read", "bytes_read", "Bytes received."),
    ("longshore_bytes_written", "bytes_written", "Bytes written to sockets."),
)


class StatusCollector:
    """A prometheus_client collector over a (read-only) status table."""

    def __init__(self, table: StatsTable) -> None:
        self.table = table

    def collect(self) -> Iterator[Metric]:
        """One scrape: every metric family, read from the table now."""
        yield from families(collect(self.table))


def families(document: dict[str, Any]) -> Iterator[Metric]:
    """The metric families of a status document (see :func:`longshore.status.collect`)."""
    # A slot whose process is being forked has no pid yet: it is nobody's series.
    processes = [process for process in document["processes"] if process["pid"] > 0]

    def labels(process: dict[str, Any]) -> list[str]:
        return [process["name"], str(process["worker_id"]), str(process["pid"])]

    for name, field, text in GAUGES:
        family = GaugeMetricFamily(name, text, labels=PROCESS_LABELS)
        for process in processes:
            family.add_metric(labels(process), float(process[field]))
        yield family
    busy = GaugeMetricFamily("longshore_busy", "1 when the process is stuck in user code, else 0.", labels=PROCESS_LABELS)
    for process in processes:
        busy.add_metric(labels(process), 1.0 if process["status"] == "busy" else 0.0)
    yield busy
    for name, field, text in COUNTERS:
        counter = CounterMetricFamily(name, text, labels=PROCESS_LABELS)
        for process in processes:
            counter.add_metric(labels(process), float(process[field]))
        yield counter
    channel = CounterMetricFamily(
        "longshore_channel_messages", "Channel messages of the process, by kind: published, delivered, dropped.", labels=[*PROCESS_LABELS, "kind"]
    )
    for process in processes:
        for kind, value in process.get("channel", {}).items():
            channel.add_metric([*labels(process), kind], float(value))
    yield channel
    exits = CounterMetricFamily("longshore_worker_exits", "Exited worker (and helper) processes, by exit status.", labels=["worker", "status"])
    for row in document["exits"]:
        exits.add_metric([row["name"], row["status"]], float(row["count"]))
    yield exits
    master = document["master"]
    yield GaugeMetricFamily("longshore_master_memory_bytes", "Resident memory of the master.", value=float(master.get("memory", 0)))
    yield GaugeMetricFamily("longshore_master_start_time_seconds", "When the master started (Unix time).", value=float(master.get("start_time", 0)))


def make_registry(table: StatsTable) -> CollectorRegistry:
    """A registry holding only the longshore metrics of ``table``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(table))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format of everything in ``registry``."""
    return generate_latest(registry)
