"""The soak benchmark's pieces without a server; the soak itself runs in tests/test_torchserve_e2e.py."""

from __future__ import annotations

import pytest

from severstal.bench import soak as bench_soak


def samples(values: list[tuple[float, float]]) -> list[dict]:
    return [{"t": t, "workers_mb": mb, "frontend_mb": 100.0, "total_mb": mb + 100.0, "worker_pids": [1]}
            for t, mb in values]


def test_growth_compares_the_second_minute_with_the_last_on_a_long_run():
    run = samples([(t, 1000.0 + t) for t in range(0, 601, 10)])
    growth = bench_soak.memory_growth(run, 600.0)
    assert growth["window_s"] == 60.0
    assert growth["from_mb"] == pytest.approx(1000.0 + 85.0)  # t = 60 .. 110
    assert growth["to_mb"] == pytest.approx(1000.0 + 570.0)  # t = 540 .. 600
    assert growth["percent"] == pytest.approx(100.0 * 485.0 / 1085.0)


def test_growth_of_a_short_run_uses_fifths_and_is_none_without_samples():
    growth = bench_soak.memory_growth(samples([(0, 500.0), (2.5, 600.0), (9.5, 660.0)]), 10.0)
    assert (growth["window_s"], growth["from_mb"], growth["to_mb"]) == (2.0, 600.0, 660.0)
    assert growth["percent"] == pytest.approx(10.0)
    empty = bench_soak.memory_growth(samples([(0, 500.0)]), 10.0)
    assert empty["from_mb"] is None and empty["percent"] is None


@pytest.mark.parametrize("url", ["http://192.0.2.1:8080/predictions/severstal", "http://example.invalid/p"])
def test_the_soak_refuses_a_server_off_this_machine(url):
    with pytest.raises(ValueError, match="use a loopback URL"):
        bench_soak.server_processes(url)


def test_the_soak_says_when_nothing_listens(tmp_path):
    from severstal.serve.server import free_port_block

    port = free_port_block(1)
    with pytest.raises(ValueError, match=f"nothing listens on port {port}"):
        bench_soak.server_processes(f"http://127.0.0.1:{port}/predictions/severstal")


@pytest.mark.parametrize("kwargs, words", [({"concurrency": 0}, "concurrency >= 1"), ({"duration": 0}, "duration > 0"),
                                           ({"max_requests": 0}, "max_requests >= 1")])
def test_the_soak_checks_its_bounds(kwargs, words, tmp_path):
    with pytest.raises(ValueError, match=words):
        bench_soak.soak("http://127.0.0.1:1/predictions/severstal", tmp_path, **kwargs)


def test_the_cli_has_the_soak_with_its_options():
    from severstal.cli import build_parser

    args = build_parser().parse_args(["bench", "soak", "--url", "http://127.0.0.1:8080/predictions/severstal",
                                      "--images", "imgs", "--concurrency", "8", "--duration", "600",
                                      "--max-requests", "100000", "--kill-worker-at", "30"])
    assert (args.concurrency, args.duration, args.max_requests, args.kill_worker_at) == (8, 600.0, 100000, 30.0)
