"""hardware_profiles: shipped profiles, loader validation, units, round trip, cluster graph, routes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.comm import CommModel
from engine.core.errors import InputError, write_atomic
from hardware_profiles import (
    FIELDS,
    PACKAGE_DIR,
    build_cluster,
    ecmp_index,
    list_profiles,
    load_profile,
    override_profile,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_FILE = PACKAGE_DIR / "h100-sxm.yaml"


def h100_raw() -> dict:
    return yaml.safe_load(SHIPPED_FILE.read_text())


def write_profile(tmp_path: Path, raw, name: str = "p.yaml") -> Path:
    text = raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False)
    return write_atomic(tmp_path / name, text)


# ----- shipped profiles -----------------------------------------------------------------------

def test_shipped_profiles_load_and_are_named_after_their_file():
    names = list_profiles()
    assert {"h100-sxm", "h800-sxm", "a100-sxm4-80gb", "h200-sxm", "b200"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p.name == name
        assert p.node.gpus >= 1 and p.node.nics >= 1
        assert p.peak_flops_per_us("bf16") > p.peak_flops_per_us("fp32")


@pytest.mark.parametrize("name, nvlink, nic_gbps, mem_gib, hbm, nvls", [
    ("h100-sxm", 450, 400, 80, 3350, True),
    ("h800-sxm", 200, 400, 80, 3350, True),
    ("a100-sxm4-80gb", 300, 200, 80, 2039, False),
    ("h200-sxm", 450, 400, 141, 4800, True),
    ("b200", 900, 400, 180, 8000, True),
])
def test_shipped_datasheet_figures(name, nvlink, nic_gbps, mem_gib, hbm, nvls):
    p = load_profile(name)
    assert p.get("node.nvlink_gbs") == nvlink
    assert p.get("node.nic_gbps") == nic_gbps
    assert p.get("gpu.memory_gib") == mem_gib
    assert p.get("gpu.hbm_gbs") == hbm
    assert p.node.nvls is nvls
    assert (p.node.gpus, p.node.nics) == (8, 8)


def test_a100_has_no_fp8_and_says_so():
    c = build_cluster(load_profile("a100-sxm4-80gb"), 1)
    with pytest.raises(InputError, match="fp8.*gives: fp64, fp32, tf32, fp16, bf16"):
        c.peak_flops_per_us("fp8")


# ----- units -----------------------------------------------------------------------------------

def test_units_are_converted_once_to_bytes_per_us_bytes_and_flop_per_us():
    p = load_profile("h100-sxm")
    assert p.node.nvlink_bytes_per_us == 450_000.0  # 450 GB/s
    assert p.node.nic_bytes_per_us == 50_000.0  # 400 Gb/s = 50 GB/s
    assert p.node.pcie_bytes_per_us == 64_000.0
    assert p.gpu.memory_bytes == 80 * 2**30 and isinstance(p.gpu.memory_bytes, int)
    assert p.gpu.hbm_bytes_per_us == 3_350_000.0
    assert p.peak_flops_per_us("bf16") == 989.5e6  # 989.5 TFLOP/s
    c = build_cluster(p, 1)
    assert c.memory_cap_bytes(3) == 80 * 2**30
    assert c.effective_flops_per_us("bf16") == pytest.approx(989.5e6 * p.gpu.compute_efficiency)


# ----- overrides ---------------------------------------------------------------------------------

def test_overrides_by_dotted_path_and_nested_mapping_agree():
    dotted = load_profile("h100-sxm", overrides={"node.nic_gbps": 200, "fabric.oversubscription": 2,
                                                 "gpu.tflops.fp4": 3000})
    nested = load_profile("h100-sxm", overrides={"node": {"nic_gbps": 200}, "fabric": {"oversubscription": 2},
                                                 "gpu": {"tflops": {"fp4": 3000}}})
    assert dotted == nested
    assert dotted.node.nic_bytes_per_us == 25_000.0
    assert dotted.fabric.oversubscription == 2
    assert dotted.peak_flops_per_us("fp4") == 3000e6
    assert dotted.node.nvlink_bytes_per_us == load_profile("h100-sxm").node.nvlink_bytes_per_us


def test_override_profile_revalidates():
    p = override_profile(load_profile("h100-sxm"), {"node.nvlink_efficiency": 0.83})
    assert p.node.nvlink_efficiency == 0.83
    with pytest.raises(InputError, match="node.nvlink_efficiency.*<= 1"):
        override_profile(p, {"node.nvlink_efficiency": 1.5})


def test_unknown_override_key_names_nearest_and_the_source():
    with pytest.raises(InputError) as e:
        load_profile("h100-sxm", overrides={"node.nic_gbs": 100}, source="scenario.yaml")
    assert e.value.source == "scenario.yaml"
    assert e.value.field == "node.nic_gbs"
    assert "did you mean 'node.nic_gbps'" in e.value.reason


# ----- validation --------------------------------------------------------------------------------

def test_unknown_key_in_file_names_file_key_and_nearest(tmp_path):
    raw = h100_raw()
    raw["node"]["nvlnk_gbs"] = raw["node"].pop("nvlink_gbs")
    path = write_profile(tmp_path, raw)
    with pytest.raises(InputError) as e:
        load_profile(path)
    assert e.value.source == str(path)
    assert e.value.field == "node.nvlnk_gbs"
    assert "did you mean 'node.nvlink_gbs'" in str(e.value)


@pytest.mark.parametrize("key, value, match", [
    ("node.nvlink_gbs", -450, "must be > 0"),
    ("node.nic_gbps", 0, "must be > 0"),
    ("node.gpus", 0, "must be >= 1"),
    ("node.gpus", 8.5, "expected an integer"),
    ("node.gpus", True, "expected an integer"),
    ("fabric.oversubscription", 0.5, "must be >= 1"),
    ("node.nic_efficiency", 0, "must be > 0"),
    ("gpu.comm_compute_slowdown", 1.0, "< 1"),
    ("node.nvlink_latency_us", -1, ">= 0"),
    ("node.nvls", "yes please", "true or false"),
    ("gpu.hbm_gbs", "1e3", "write 1.0e3"),
    ("gpu.hbm_gbs", float("inf"), "finite"),
    ("gpu.tflops.bf16", -1, "must be > 0"),
])
def test_bad_values_are_refused_with_the_key(key, value, match):
    with pytest.raises(InputError, match=match) as e:
        load_profile("h100-sxm", overrides={key: value})
    assert e.value.field == key


def test_missing_required_field_names_file(tmp_path):
    raw = h100_raw()
    del raw["node"]["nics"]
    path = write_profile(tmp_path, raw)
    with pytest.raises(InputError, match="missing") as e:
        load_profile(path)
    assert (e.value.source, e.value.field) == (str(path), "node.nics")


def test_a_profile_needs_some_throughput(tmp_path):
    raw = h100_raw()
    del raw["gpu"]["tflops"]
    with pytest.raises(InputError, match="gpu.tflops: give the peak"):
        load_profile(write_profile(tmp_path, raw))


def test_unknown_profile_lists_the_shipped_ones():
    with pytest.raises(InputError) as e:
        load_profile("h10-sxm")
    assert e.value.field == "profile"
    assert "did you mean 'h100-sxm'" in e.value.reason
    for name in list_profiles():
        assert name in e.value.reason


def test_relative_path_resolves_against_source(tmp_path):
    write_profile(tmp_path, h100_raw(), "mine.yaml")
    p = load_profile("mine.yaml", source=tmp_path / "scenario.yaml")
    assert p == load_profile("h100-sxm")  # same content, and the name inside the file wins
    with pytest.raises(InputError, match="no profile file"):
        load_profile("other.yaml", source=tmp_path / "scenario.yaml")


def test_malformed_yaml_gives_the_line(tmp_path):
    path = write_profile(tmp_path, "name: x\ngpu:\n  model: [a\n  memory_gib: 80\n")
    with pytest.raises(InputError, match=r"line 4: invalid YAML") as e:
        load_profile(path)
    assert e.value.source == str(path)


def test_duplicate_keys_are_refused(tmp_path):
    text = SHIPPED_FILE.read_text().replace("  gpus: 8\n", "  gpus: 8\n  gpus: 4\n")
    with pytest.raises(InputError, match="duplicate key 'gpus'"):
        load_profile(write_profile(tmp_path, text))


def test_non_mapping_section_is_refused():
    with pytest.raises(InputError, match="expected a mapping"):
        load_profile("h100-sxm", overrides={"node": 5})


# ----- round trip --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_profiles())
def test_yaml_round_trip_of_shipped_profiles(name, tmp_path):
    p = load_profile(name)
    path = write_atomic(tmp_path / f"{name}-fitted.yaml", p.to_yaml())
    q = load_profile(path)
    assert q == p
    assert yaml.safe_load(q.to_yaml()) == p.to_dict()


@settings(max_examples=40, deadline=None)
@given(nvlink=st.floats(0.001, 1e5), nic=st.floats(0.001, 1e5), mem=st.floats(0.001, 1e4),
       eff=st.floats(0.001, 1.0), tf=st.floats(0.001, 1e5), over=st.floats(1.0, 64.0))
def test_round_trip_is_exact_for_awkward_values(nvlink, nic, mem, eff, tf, over):
    p = load_profile("h100-sxm", overrides={"node.nvlink_gbs": nvlink, "node.nic_gbps": nic,
                                            "gpu.memory_gib": mem, "node.pcie_efficiency": eff,
                                            "gpu.tflops.fp16": tf, "fabric.oversubscription": over})
    q = override_profile(load_profile("h100-sxm"), yaml.safe_load(p.to_yaml()))
    assert q == p


def test_readme_documents_every_field():
    readme = (PACKAGE_DIR / "README.md").read_text()
    for f in FIELDS:
        key = "gpu.tflops.<dtype>" if f.path.startswith("gpu.tflops.") else f.path
        assert f"`{key}`" in readme, key


# ----- topology ----------------------------------------------------------------------------------

def small_fabric(nodes: int, **extra):
    """h100-sxm with 2 nodes per leaf and 4 spines, so a few nodes already span leaves."""
    over = {"fabric.nodes_per_leaf": 2, "fabric.spines": 4, **extra}
    return build_cluster(load_profile("h100-sxm", overrides=over), nodes)


def test_single_node_has_no_switch_levels():
    c = build_cluster(load_profile("h100-sxm"), 1)
    kinds = Counter(d["kind"] for _, d in c.topology.nodes(data=True))
    assert kinds == {"gpu": 8, "nic": 8, "nvswitch": 1}
    assert c.link_classes() == ("nvlink", "pcie")
    assert (c.n_gpus, c.gpus_per_node, c.gpu_model) == (8, 8, "h100-sxm")


def test_every_link_exists_in_both_directions_with_effective_bandwidth():
    c = small_fabric(5)
    p = c.profile
    for u, v, d in c.topology.edges(data=True):
        back = c.topology.edges[v, u]
        assert back == d
        assert d["bandwidth"] == pytest.approx(d["nominal_bandwidth"] * p.link_efficiency(d["link_class"]))
    # per leaf: 2 nodes x 8 NICs x 50,000 B/us down, non-blocking, over 4 spines
    assert c.class_bandwidth("spine", effective=False) == 2 * 8 * 50_000 / 4
    assert c.topology.edges["leaf0", "spine3"]["link_class"] == "spine"
    assert c.n_leaves == 3 and c.n_spines == 4


def test_intra_node_route_is_two_hops_through_nvswitch():
    c = small_fabric(2)
    assert c.route(1, 6) == (("gpu1", "nvsw0"), ("nvsw0", "gpu6"))
    assert c.route(9, 9) == ()
    assert c.route_class(1, 6) == "nvlink" and c.route_class(9, 9) == "local"


def test_inter_node_route_uses_the_gpus_nics_and_a_spine_only_across_leaves():
    c = small_fabric(4)
    same_leaf = c.route(2, 8 + 5)  # node 0 -> node 1, both under leaf 0
    assert same_leaf == (("gpu2", "nic0.2"), ("nic0.2", "leaf0"), ("leaf0", "nic1.5"), ("nic1.5", "gpu13"))
    assert c.route_class(2, 13) == "nic"
    across = c.route(2, 2 * 8 + 5)  # node 0 (leaf 0) -> node 2 (leaf 1)
    hops = [u for u, _ in across] + [across[-1][1]]
    assert hops[:3] == ["gpu2", "nic0.2", "leaf0"] and hops[4:] == ["leaf1", "nic2.5", "gpu21"]
    assert hops[3].startswith("spine")
    assert c.route_class(2, 21) == "spine"
    for u, v in across:
        assert c.topology.has_edge(u, v)


def test_nodes_under_one_leaf_need_no_spine():
    c = build_cluster(load_profile("h100-sxm"), 4)  # 32 nodes per leaf
    assert (c.n_leaves, c.n_spines) == (1, 0)
    assert not any(n.startswith("spine") for n in c.topology)
    assert len(c.route(0, 31)) == 4
    assert c.link_classes() == ("nvlink", "pcie", "nic")


def test_gpus_share_nics_when_there_are_fewer_nics():
    c = small_fabric(2, **{"node.nics": 4})
    assert [c.nic_of(g) for g in range(8)] == [f"nic0.{j}" for j in (0, 0, 1, 1, 2, 2, 3, 3)]
    assert c.route(5, 13)[0] == ("gpu5", "nic0.2")


def test_transfer_time_formula_by_hand():
    c = build_cluster(load_profile("h100-sxm"), 2)
    # in a node: 2 NVLink hops of 0.5 us + 5 us overhead + 3.6 MB at 450,000 x 0.8 B/us
    assert c.transfer_time(0, 1, 3_600_000) == pytest.approx(0.5 + 0.5 + 5.0 + 3_600_000 / 360_000)
    # across nodes: PCIe 0.5 + NIC 1 + NIC 1 + PCIe 0.5 + 5; bottleneck NIC 50,000 x 0.9 B/us
    assert c.transfer_time(0, 9, 9_000_000) == pytest.approx(3.0 + 5.0 + 9_000_000 / 45_000)
    assert c.transfer_time(3, 3, 10**9) == 0.0
    assert c.transfer_time(0, 9, 0) == 0.0
    # the planners' model uses the same figure, scaled by route class
    comm = CommModel(c, class_scale={"nic": 2.0})
    assert comm.route_delay(0, 9, 9_000_000) == pytest.approx(2 * c.transfer_time(0, 9, 9_000_000))
    assert comm.route_delay(0, 1, 3_600_000) == pytest.approx(c.transfer_time(0, 1, 3_600_000))


def test_across_leaves_adds_the_spine_hops_only_to_latency():
    c = small_fabric(4)
    t_leaf, t_spine = c.transfer_time(0, 8, 1_000_000), c.transfer_time(0, 16, 1_000_000)
    assert t_spine - t_leaf == pytest.approx(2 * c.profile.fabric.latency_us)


def test_bad_gpu_and_node_counts_are_input_errors():
    c = build_cluster(load_profile("h100-sxm"), 1)
    with pytest.raises(InputError, match="GPU 8 not in the cluster"):
        c.route(0, 8)
    with pytest.raises(InputError, match="nodes"):
        build_cluster(load_profile("h100-sxm"), 0)


ECMP_SCRIPT = """
import json
from hardware_profiles import build_cluster, load_profile
c = build_cluster(load_profile("h100-sxm", overrides={"fabric.nodes_per_leaf": 2, "fabric.spines": 4}), 8)
print(json.dumps([[c.route(a, b, s)[3][0] for s in range(3)] for a in range(0, 16) for b in range(32, 64, 3)]))
"""


def test_ecmp_is_deterministic_across_processes():
    c = small_fabric(8)
    here = [[c.route(a, b, s)[3][0] for s in range(3)] for a in range(0, 16) for b in range(32, 64, 3)]
    runs = []
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", ECMP_SCRIPT], capture_output=True, text=True, check=True,
                             cwd=ROOT, env={"PYTHONHASHSEED": seed, "PATH": "", "PYTHONPATH": str(ROOT)})
        runs.append(json.loads(out.stdout))
    assert runs[0] == runs[1] == here


def test_ecmp_spreads_pairs_and_salts_over_the_spines():
    c = small_fabric(8)
    pairs = [(a, b) for a in range(16) for b in range(32, 64)]  # 512 pairs from leaf 0 to leaves 2, 3
    load = Counter(c.route(a, b)[2][1] for a, b in pairs)
    assert set(load) == {f"spine{s}" for s in range(4)}
    assert max(load.values()) < 1.25 * len(pairs) / 4
    salted = Counter(c.route(0, 40, s)[2][1] for s in range(32))
    assert len(salted) == 4
    assert all(0 <= ecmp_index(a, b, 0, 7) < 7 for a, b in pairs)


def test_64_node_cluster_builds_fast():
    p = load_profile("h100-sxm", overrides={"fabric.nodes_per_leaf": 16, "fabric.spines": 8})
    t0 = time.perf_counter()
    c = build_cluster(p, 64)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0
    assert c.n_gpus == 512 and c.node_of(511) == 63
    # links: 512 NVLink + 512 PCIe + 512 NIC ports + 4 leaves x 8 spines, both directions
    assert c.topology.number_of_edges() == 2 * (512 * 3 + 4 * 8)
    assert c.transfer_time(0, 511, 45_000) == pytest.approx(0.5 + 1 + 0.5 + 0.5 + 1 + 0.5 + 5 + 1.0)


# ----- CLI ---------------------------------------------------------------------------------------

def test_cli_profiles_lists_key_figures():
    from engine.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["profiles", "--json"])
    assert out.exit_code == 0, out.output
    rows = {r["name"]: r for r in json.loads(out.output)["profiles"]}
    assert sorted(rows) == list_profiles()
    assert rows["h100-sxm"]["nvlink_gbs"] == 450 and rows["a100-sxm4-80gb"]["fp8_tflops"] is None
    table = runner.invoke(main, ["profiles"])
    assert table.exit_code == 0 and "h800-sxm" in table.output and "8 x 400" in table.output
    one = runner.invoke(main, ["profiles", "b200"])
    assert yaml.safe_load(one.output) == load_profile("b200").to_dict()
    bad = runner.invoke(main, ["profiles", "nope"])
    assert bad.exit_code == 2 and "unknown profile 'nope'" in bad.output
