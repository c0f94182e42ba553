"""`kmsq bench --quick` runs on real Redis, Postgres, SoftHSM2 and worker processes, and its JSON has every
figure the performance report needs; with ``--compare-broker`` B, C, D and G again on RabbitMQ, over Redis's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.queue_fixtures import Deployment, kmsq_command

FIGURE = {"items", "elapsed_s", "per_s", "p50_ms", "p99_ms"}


def test_bench_quick_reports_every_figure(deployment: Deployment, rabbitmq_url: str, tmp_path: Path) -> None:
    out_dir = tmp_path / "bench"
    result = subprocess.run(
        [*kmsq_command(), "bench", "--quick", "--rss-job", "2000", "--out-dir", str(out_dir), "--compare-broker",
         rabbitmq_url, "--json"],
        env=deployment.env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert json.loads((out_dir / "bench.json").read_text()) == report
    assert (out_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "bench-gateway.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # G against clients
    for name in ("A_raw_hsm", "F_pbkdf2_aes_ccm"):
        assert set(report[name]) >= FIGURE and report[name]["per_s"] > 0
    assert set(report["workers"]) == {"1", "2"}
    for measured in report["workers"].values():
        for name in ("B_noop_round_trip", "C_generate_data_key", "E_put_key_single", "E_put_keys_batch_100",
                     "S_shed_bad_signature"):  # fmt: skip
            assert set(measured[name]) >= FIGURE and measured[name]["per_s"] > 0
        assert set(measured["D_generate_data_keys"]) == {"1", "10", "100", "1000"}
        assert all(d["per_s"] > 0 for d in measured["D_generate_data_keys"].values())
        assert measured["worker_rss"]["peak_mib"] > 10
    job = report["workers"]["2"]["rss_job"]
    assert job["items"] == 2000 and job["rss_mib_peak"] > 10 and job["rss_kib_samples"]
    only_most = {"C_coalesced_cpu_over_B_cpu", "C_coalesced_over_C", "G", "K_over_C", "K_signEth256_cpu_over_raw"}
    for workers in ("1", "2"):
        assert set(report["ratios"][workers]) - only_most == {
            "C_over_B", "D1000_over_A", "E_batched_over_F", "C_over_B_cpu_bound", "S_over_C", "D1000_cpu_over_A_cpu",
            "C_cpu_over_B_cpu",
        }  # fmt: skip
        assert report["ratios"][workers]["S_over_C"] > 0
        assert 0 < report["ratios"][workers]["C_over_B_cpu_bound"] < 1
        for name in ("B_noop_round_trip", "C_generate_data_key"):
            cpu = report["workers"][workers][name]["cpu_ms_per_item"]
            assert set(cpu) == {"client", "worker_main", "worker_children", "redis", "postgres", "total"}
            assert cpu["total"] > 0
        assert report["workers"][workers]["D_generate_data_keys"]["1000"]["cpu_ms_per_item"]["total"] > 0
    assert report["A_raw_hsm"]["cpu_ms_per_item"]["total"] > 0
    # The coalescing client, and G: every endpoint with coalescing off and on, at the most workers only.
    most = report["workers"]["2"]
    assert set(report["ratios"]["2"]) >= only_most and not set(report["ratios"]["1"]) & only_most
    assert most["C_coalesced"]["per_s"] > 0 and most["C_coalesced"]["batches"] > 0
    gateway = most["G_gateway"]
    assert set(gateway) == {"off", "on"}
    for mode in gateway.values():
        assert set(mode) == {"generateDataKey", "decryptDataKey", "putKey", "getKey", "signEth"}
        assert set(mode["signEth"]) == {"1", "256"}
        assert set(mode["generateDataKey"]) == {"1", "16", "64", "256"} and set(mode["getKey"]) == {"64", "256"}
        for cells in mode.values():
            for cell in cells.values():
                assert set(cell) >= FIGURE and cell["per_s"] > 0
                assert "gateway" in cell["cpu_ms_per_item"] and cell["cpu_ms_per_item"]["total"] > 0
    # K: signatures per second (ETH hashes with a sealed xprv and with a token key, a 10-input PSBT), against C.
    signing = most["K_signing"]
    assert set(signing) == {"eth_hash", "eth_hash_in_hsm", "psbt_10_inputs", "psbt_bytes"}
    assert signing["psbt_10_inputs"]["signatures_per_call"] == 10 and signing["psbt_10_inputs"]["items"] >= 20
    k_over_c = report["ratios"]["2"]["K_over_C"]
    assert set(k_over_c) == {"eth_hash", "eth_hash_in_hsm", "psbt_10_inputs"} and min(k_over_c.values()) > 0
    g = report["ratios"]["2"]["G"]
    assert g["generateDataKey 256 on_over_off"] > 0 and g["generateDataKey 256 on_over_D100"] > 0
    assert g["getKey 64 cpu on_over_off"] > 0 and g["putKey 256 p99 on_over_off"] > 0
    # K through the gateway: ETH hashes at 256 clients over one (issue 26 asks >= 8 on a full run), and the CPU of
    # one such signature over the raw in-process loop's.
    assert g["signEth 256_over_1"] > 0 and report["ratios"]["2"]["K_signEth256_cpu_over_raw"] > 0
    assert set(report["K_raw_signing"]) >= FIGURE and report["K_raw_signing"]["cpu_ms_per_item"]["total"] > 0
    assert report["W_request_work"]["cpu_ms_per_item"] > 0
    # The audit chain's cost, measured in process (no worker can be told to skip it).
    append = report["W_audit_append"]
    assert append["count"] > 0 and append["record_and_append"]["cpu_ms"] > 0 and append["record"]["cpu_ms"] > 0
    assert report["ratios"]["audit_append_cpu_over_W_cpu"] == round(
        append["append"]["cpu_ms"] / report["W_request_work"]["cpu_ms_per_item"], 3
    )
    # R: the rows the E runs stored under the bench root key, rewrapped after a rotation.
    stored = sum(report["sizes"][k] for k in ("put_single", "put_batched")) * len(report["workers"])
    assert report["R_rewrap"]["items"] >= stored and report["R_rewrap"]["failed"] == 0
    assert report["R_rewrap"]["per_s"] > 0 and report["ratios"]["R_over_A"] > 0
    assert report["machine"]["cores"] >= 1
    # B, C, D and G on RabbitMQ in the same run (this run's vhost), each over its Redis figure.
    other = report["broker_comparison"]
    assert other["workers"] == 2 and other["broker"].startswith("amqp://")
    assert set(other["figures"]) == {"B_noop_round_trip", "C_generate_data_key", "D_generate_data_keys", "G_gateway"}
    assert other["figures"]["B_noop_round_trip"]["cpu_ms_per_item"]["rabbitmq"] > 0  # the broker's own CPU
    assert {"B", "C", "D1", "D1000", "G_on_generateDataKey_64"} <= set(other["over_first_broker"])
    assert all(v is not None and v > 0 for v in other["over_first_broker"].values())
    assert_sharing(report)


def assert_sharing(report: dict[str, Any]) -> None:
    """Q: sharing the pool. Both deployments measured in the run, each with its idle and loaded interactive
    latencies and the job's rate alone and beside them; the quota held (the greedy caller passed about its quota)."""
    sharing = report["Q_sharing"]
    for name in ("shared", "lanes"):
        lanes = sharing["Q1_lanes"][name]
        for phase in ("idle", "loaded"):
            assert lanes[phase]["errors"] == 0
            assert all(lanes[phase][kind]["count"] > 0 and lanes[phase][kind]["p99_ms"] > 0
                       for kind in ("generate_data_key", "sign"))  # fmt: skip
        assert lanes["job_keys_per_s_alone"] > 0 and lanes["job_keys_per_s_with_interactive"] > 0
        assert set(sharing["summary"][name]) == {"generate_data_key_p99_loaded_over_idle", "sign_p99_loaded_over_idle",
                                                 "job_with_interactive_over_alone", "meets_targets"}  # fmt: skip
    quotas = sharing["Q2_quotas"]
    assert quotas["alone"]["ok"] > 0 and quotas["alone"]["rate_limited"] == 0
    seconds = report["sizes"]["sharing_seconds"]
    for mode in ("at_quota", "backs_off", "hammers", "at_quota_again", "backs_off_again"):  # bench_lanes.SCHEDULE
        greedy = quotas[mode]["greedy_caller"]
        # at most a full bucket and the refill over the window pass
        assert 0 < greedy["ok"] <= quotas["greedy_quota_per_s"] * (1 + 1 / seconds) * 1.05 + 1
        assert quotas[mode]["bench_caller"]["ok"] > 0 and quotas[mode]["bench_caller"]["rate_limited"] == 0
    assert (
        quotas["hammers"]["greedy_caller"]["rate_limited"] > 0
        and quotas["backs_off"]["greedy_caller"]["rate_limited"] > 0
        and quotas["backs_off_again"]["greedy_caller"]["rate_limited"] > 0
    )
    assert quotas["at_quota_windows_apart"] > 0  # the baseline's own spread, measured
