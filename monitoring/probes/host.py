"""The appliance's own health: disk, memory and temperature, read with psutil.

Two surfaces: :class:`HostCollector` exports the raw figures to Prometheus
at scrape time (nothing to schedule, never stale), and :class:`HostProbe`
turns them into up/down evidence for the health model (``host:disk``,
``host:memory``, ``host:temperature``) so a filling disk raises the same
kind of transition as a dead trunk.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from monitoring.probes.base import ProbeResult

HOST_CHECKS = ("disk", "memory", "temperature")


class HostProbe:
    def __init__(
        self,
        state_dir: Path,
        *,
        disk_min_free_pct: float = 10.0,
        memory_min_available_pct: float = 5.0,
        max_temperature_c: float = 85.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state_dir = state_dir
        self._disk_min = disk_min_free_pct
        self._mem_min = memory_min_available_pct
        self._temp_max = max_temperature_c
        self._clock = clock

    def probe(self, target: str, check: str) -> ProbeResult:
        if check == "disk":
            usage = psutil.disk_usage(str(_existing(self._state_dir)))
            free_pct = 100.0 - usage.percent
            return self._judge(
                target, free_pct >= self._disk_min, f"{free_pct:.1f}% free, minimum {self._disk_min:g}%"
            )
        if check == "memory":
            mem = psutil.virtual_memory()
            available_pct = 100.0 * mem.available / mem.total
            return self._judge(
                target,
                available_pct >= self._mem_min,
                f"{available_pct:.1f}% available, minimum {self._mem_min:g}%",
            )
        if check == "temperature":
            hottest = max((t.current for _, t in _temperatures()), default=None)
            if hottest is None:
                return self._judge(target, True, "no temperature sensors")
            return self._judge(
                target, hottest <= self._temp_max, f"hottest {hottest:.0f} °C, maximum {self._temp_max:g} °C"
            )
        raise ValueError(f"unknown host check {check!r}; known: {', '.join(HOST_CHECKS)}")

    def _judge(self, target: str, ok: bool, detail: str) -> ProbeResult:
        return ProbeResult(target, ok, self._clock(), None, None, "ok" if ok else "threshold", detail)


CPU_SAMPLE_S = 10.0  # the CPU ratio's window: the same whoever scrapes, and however often


class CpuSampler:
    """The host's CPU busy ratio over fixed windows, measured by the daemon itself.

    Why not ``psutil.cpu_percent(interval=None)`` at scrape time: that measures
    since the *previous call*, so two Prometheus servers (or a curl) scraping the
    same appliance each shortened the other's window and the figure depended on
    who scraped. A thread reads the CPU times every *interval_s* and keeps the
    ratio of the last complete window; a scrape only reads it.
    """

    def __init__(self, interval_s: float = CPU_SAMPLE_S) -> None:
        self.interval_s = interval_s
        self.ratio: float | None = None  # None until the first window has passed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cpu sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        before = psutil.cpu_times()
        while not self._stop.wait(self.interval_s):
            after = psutil.cpu_times()
            self.ratio = busy_ratio(before, after)
            before = after


def busy_ratio(before: Any, after: Any) -> float:
    """The busy share of the CPU time between two ``psutil.cpu_times()`` readings (0-1)."""
    idle_fields = ("idle", "iowait")
    total = sum(after) - sum(before)
    if total <= 0:
        return 0.0
    idle = sum(getattr(after, f, 0.0) - getattr(before, f, 0.0) for f in idle_fields)
    return min(1.0, max(0.0, 1.0 - idle / total))


class HostCollector(Collector):
    """Host figures for /metrics: CPU from the daemon's own sampler, the rest read at scrape time."""

    def __init__(
        self, state_dir: Path, interfaces: Iterable[str] = (), cpu: CpuSampler | None = None
    ) -> None:
        self._state_dir = state_dir
        self._interfaces = tuple(interfaces)
        self.cpu = cpu or CpuSampler()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        ratio = self.cpu.ratio
        yield GaugeMetricFamily(
            "hotsite_host_cpu_ratio",
            "CPU busy ratio over the daemon's own sampling window, 10 s (0-1, NaN until the first);"
            " the same whoever scrapes.",
            value=math.nan if ratio is None else ratio,
        )
        mem = psutil.virtual_memory()
        yield GaugeMetricFamily(
            "hotsite_host_memory_available_bytes", "Memory available.", value=mem.available
        )
        yield GaugeMetricFamily("hotsite_host_memory_total_bytes", "Memory installed.", value=mem.total)
        usage = psutil.disk_usage(str(_existing(self._state_dir)))
        disk = GaugeMetricFamily(
            "hotsite_host_disk_free_bytes", "Free space on the state directory's filesystem.", labels=["path"]
        )
        disk.add_metric([str(self._state_dir)], usage.free)
        yield disk
        temps = GaugeMetricFamily(
            "hotsite_host_temperature_celsius", "Temperature sensors (hardware, bounded).", labels=["sensor"]
        )
        for sensor, reading in _temperatures():
            temps.add_metric([sensor], reading.current)
        yield temps
        errors = CounterMetricFamily(
            "hotsite_host_nic_errors", "NIC errors and drops by direction.", labels=["interface", "kind"]
        )
        counters = psutil.net_io_counters(pernic=True)
        for name in self._interfaces:
            nic = counters.get(name)
            if nic is None:
                continue
            for kind, value in (
                ("errin", nic.errin),
                ("errout", nic.errout),
                ("dropin", nic.dropin),
                ("dropout", nic.dropout),
            ):
                errors.add_metric([name, kind], value)
        yield errors


def _temperatures() -> list[tuple[str, psutil._common.shwtemp]]:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return []
    readings = []
    for chip, sensors in (reader() or {}).items():
        for i, sensor in enumerate(sensors):
            readings.append((f"{chip}:{sensor.label or i}", sensor))
    return readings


def _existing(path: Path) -> Path:
    """The nearest existing ancestor (the state dir may not exist yet at check time)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
