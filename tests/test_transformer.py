"""The transformer workload builder: FLOPs, times, memory, layout, op structure, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.core.comm import CommModel
from engine.core.errors import InputError
from engine.core.ir import Collective
from engine.planners.validate import validate_plan
from engine.scenario.loader import load_scenario, scenario_from_dict
from engine.workloads.transformer import (
    build_transformer,
    gpu_of,
    rank_params,
    spec_from_dict,
    stage_times,
    step_end_times,
)
from engine.workloads.transformer_costs import (
    RECOMPUTE,
    ComputeModel,
    activation_bytes_per_layer,
    layer_params,
    stage_cost,
    total_params,
)
from hardware_profiles import build_cluster, load_profile

ROOT = Path(__file__).resolve().parents[1]
H100 = build_cluster(load_profile("h100-sxm"), 1)
BASE = {"kind": "transformer", "layers": 8, "hidden": 1024, "heads": 16, "seq_len": 512, "vocab": 32000,
        "global_batch": 8, "micro_batch": 2, "precision": "bf16"}


def spec(**kw):
    par = kw.pop("parallelism", {})
    return spec_from_dict({**BASE, **kw, "parallelism": par})


def flat_cost(coll):
    return 10.0  # us per collective: keeps hand-computed times simple


def test_forward_flops_follow_the_layer_shapes():
    """Summed over stages and TP ranks, one micro-batch's forward is 24bsh^2 + 4bs^2h per layer + 2bshV."""
    sp = spec(parallelism={"tp": 2, "pp": 2})
    wl = build_transformer(sp, H100)
    b, s, h, V, L = 2, 512, 1024, 32000, 8
    fwd = sum(op.flops for op in wl.ops.values() if op.phase == "F" and op.microbatch == 0)
    assert fwd == pytest.approx(L * (24 * b * s * h * h + 4 * b * s * s * h) + 2 * b * s * h * V, rel=1e-12)
    bwd = sum(op.flops for op in wl.ops.values() if op.phase in ("B", "W") and op.microbatch == 0)
    # input gradients repeat every GEMM and twice the attention matmuls; weight gradients every GEMM
    assert bwd == pytest.approx(2 * fwd, rel=1e-12)


def test_time_is_flops_over_peak_times_efficiency():
    sp = spec(precision="fp16")
    model = ComputeModel(peak_flops_per_us=H100.peak_flops_per_us("fp16"), efficiency=0.4, hbm_bytes_per_us=1e30)
    wl = build_transformer(sp, H100, compute=model)
    w = wl.op("W0.s0")  # weight gradients: GEMMs only
    assert w.duration_us == pytest.approx(w.flops / (H100.peak_flops_per_us("fp16") * 0.4), rel=1e-12)
    half = ComputeModel(peak_flops_per_us=1e6, efficiency=0.5, gemm_half_flops=2e9)
    assert half.gemm_us(2e9) == pytest.approx(2 * 2e9 / (1e6 * 0.5))  # half the efficiency at F_half


# Korthikanti et al. 2022, Table 2: activation bytes of one layer and micro-batch on one TP rank,
# 16-bit activations. Hand-worked for s=2048, b=1, h=4096, a=32, t=2:
#   sbh = 2048 * 1 * 4096 = 8,388,608;  5as/h = 5 * 32 * 2048 / 4096 = 80
# without sequence parallelism (what the workload models):
#   none      sbh(10 + 24/t + 5as/(ht)) = sbh(10 + 12 + 40) = 62 sbh = 520,093,696
#   selective sbh(10 + 24/t)            = sbh(10 + 12)      = 22 sbh = 184,549,376
#   full      2sbh                                            =  2 sbh =  16,777,216
# with sequence parallelism (everything split over t):
#   none      sbh(34 + 5as/h)/t = sbh(34 + 80)/2 = 57 sbh = 478,150,656
#   selective 34sbh/t           = 17 sbh               = 142,606,336
#   full      2sbh/t            =  1 sbh               =   8,388,608
KORTHIKANTI_T2 = {"s": 2048, "b": 1, "h": 4096, "a": 32, "t": 2}


def korthikanti_spec(recompute, **over):
    shape = {**KORTHIKANTI_T2, **over}
    return spec_from_dict({"kind": "transformer", "layers": 2, "hidden": shape["h"], "heads": shape["a"],
                           "seq_len": shape["s"], "vocab": 1024, "global_batch": shape["b"],
                           "micro_batch": shape["b"], "activation_recompute": recompute,
                           "parallelism": {"tp": shape["t"]}})


@pytest.mark.parametrize("sequence_parallel,recompute,expected", [
    (False, "none", 520_093_696), (False, "selective", 184_549_376), (False, "full", 16_777_216),
    (True, "none", 478_150_656), (True, "selective", 142_606_336), (True, "full", 8_388_608)])
def test_activation_memory_per_layer_is_korthikanti_table_2(sequence_parallel, recompute, expected):
    sp = korthikanti_spec(recompute)
    assert activation_bytes_per_layer(sp, sequence_parallel=sequence_parallel) == expected
    # the form with the spec's own recompute is the one the recompute argument names
    assert activation_bytes_per_layer(korthikanti_spec("none"), recompute, sequence_parallel) == expected


def test_activation_memory_default_is_the_no_sequence_parallel_form():
    """The workload has no sequence parallelism: the default and the stage costs use the no-SP form."""
    for recompute, expected in (("none", 520_093_696), ("selective", 184_549_376), ("full", 16_777_216)):
        sp = korthikanti_spec(recompute)
        assert activation_bytes_per_layer(sp) == expected
        # stage 0 holds 1 layer (pp=2 below) plus the embedding dropout mask and output 2sbh/t = 8,388,608
        two = spec_from_dict({"kind": "transformer", "layers": 2, "hidden": 4096, "heads": 32, "seq_len": 2048,
                              "vocab": 1024, "global_batch": 1, "micro_batch": 1, "activation_recompute": recompute,
                              "parallelism": {"tp": 2, "pp": 2}})
        assert stage_cost(two, 0).activation_bytes == expected + 8_388_608


@pytest.mark.parametrize("recompute,expected", [
    # t=4: sbh = 8,388,608, 5as/(ht) = 80/4 = 20; no SP: sbh(10 + 6 + 20) = 36 sbh, sbh(10 + 6) = 16 sbh, 2 sbh
    ("none", 36 * 8_388_608), ("selective", 16 * 8_388_608), ("full", 2 * 8_388_608)])
def test_activation_memory_without_sequence_parallelism_at_t4(recompute, expected):
    assert activation_bytes_per_layer(korthikanti_spec(recompute, t=4)) == expected
    assert expected == {"none": 301_989_888, "selective": 134_217_728, "full": 16_777_216}[recompute]


@pytest.mark.parametrize("recompute", RECOMPUTE)
def test_activation_forms_coincide_without_tensor_parallelism(recompute):
    # t=1: sbh(10 + 24 + 80) = 114 sbh = sbh(34 + 80); 34 sbh both ways; 2 sbh both ways
    sp = korthikanti_spec(recompute, t=1)
    expected = {"none": 114 * 8_388_608, "selective": 34 * 8_388_608, "full": 2 * 8_388_608}[recompute]
    assert activation_bytes_per_layer(sp) == activation_bytes_per_layer(sp, sequence_parallel=True) == expected


@pytest.mark.parametrize("recompute,per_layer", [
    # BASE at tp=2: s=512, b=2, h=1024, a=16: sbh = 1,048,576, 5as/(ht) = 5 * 16 * 512 / (1024 * 2) = 20
    ("none", 42 * 1_048_576),       # sbh(10 + 12 + 20) = 44,040,192
    ("selective", 22 * 1_048_576),  # sbh(10 + 12)      = 23,068,672
    ("full", 2 * 1_048_576)])       # 2sbh              =  2,097,152
def test_middle_stage_forward_holds_its_layers_activations_until_w(recompute, per_layer):
    sp = spec(activation_recompute=recompute, layers=9, parallelism={"tp": 2, "pp": 3})
    assert activation_bytes_per_layer(sp) == per_layer
    wl = build_transformer(sp, H100)
    middle = wl.op("F0.s1.t1")  # a stage without embedding or logits: 3 layers
    assert middle.memory_bytes == 3 * per_layer
    assert middle.release == ("W0.s1.t1",)


def test_parameters_and_static_memory():
    sp = spec(parallelism={"pp": 2})
    h, V = 1024, 32000
    assert layer_params(sp) == 12 * h * h + 13 * h
    # one copy of every weight, plus the output layer's copy of the tied embedding on the last rank
    assert sum(rank_params(sp)) == total_params(sp) + V * h
    wl = build_transformer(sp, H100)
    # bf16: weights 2 B, fp32 gradients 4 B, fp32 master + Adam m, v 12 B per parameter
    assert wl.static_memory_bytes == {0: 18 * rank_params(sp)[0], 1: 18 * rank_params(sp)[1]}
    zero = build_transformer(spec(distributed_optimizer=True, parallelism={"dp": 4}), H100)
    assert zero.static_memory_bytes[0] == rank_params(spec())[0] * (2 + 4) + 12 * rank_params(spec())[0] // 4


def test_layout_is_tp_innermost_then_pp_then_dp():
    sp = spec(global_batch=16, parallelism={"tp": 2, "pp": 2, "dp": 2})
    wl = build_transformer(sp, H100)
    assert [gpu_of(sp, d, p, r) for d in range(2) for p in range(2) for r in range(2)] == list(range(8))
    assert wl.op("F3.s1.t1.d1").devices == (7,) and wl.op("F0.s0.t1.d0").devices == (1,)
    assert wl.op("F0.s1.ar.d1").collective.group == (6, 7)
    assert wl.op("DP.p1.t0").collective == Collective("all_reduce", (2, 6), rank_params(sp)[1] * 4)
    assert wl.op("EMB.t1.d0").collective.group == (1, 3)


def test_op_structure_and_counts():
    m, tp, pp, dp = 4, 2, 2, 2
    sp = spec(global_batch=16, parallelism={"tp": tp, "pp": pp, "dp": dp})
    wl = build_transformer(sp, H100)
    kinds = {}
    for o in wl.ops.values():
        kinds[o.phase] = kinds.get(o.phase, 0) + 1
    per = m * pp * tp * dp
    assert kinds == {"F": 2 * per + m * pp * dp, "B": 2 * per + m * pp * dp, "W": per,
                     "DP": pp * tp, "EMB": tp * dp, "OPT": pp * tp * dp}
    g = wl.graph
    # F -> all-reduce -> epilogue -> next stage's F carries b*s*h*2 bytes / tp
    assert g.has_edge("F0.s0.t0.d0", "F0.s0.ar.d0") and g.has_edge("F0.s0.ar.d0", "F0.s0.end.t0.d0")
    assert g.edges["F0.s0.end.t0.d0", "F0.s1.t0.d0"]["bytes"] == 2 * 512 * 1024 * 2 // 2
    # 1F1B (Megatron): the gradient leaves after the whole backward (W) of the next stage
    assert g.edges["W0.s1.t0.d0", "B0.s0.t0.d0"]["bytes"] > 0 and not g.has_edge("B0.s1.t0.d0", "B0.s0.t0.d0")
    zb = build_transformer(spec(global_batch=16, parallelism={"tp": tp, "pp": pp, "dp": dp, "schedule": "zb-h1"}), H100)
    assert zb.graph.edges["B0.s1.end.t0.d0", "B0.s0.t0.d0"]["bytes"] > 0 and not zb.graph.has_edge("W0.s1.t0.d0", "B0.s0.t0.d0")


def test_tp_comm_is_one_collective_per_phase_with_per_message_latency_in_the_epilogue():
    sp = spec(parallelism={"tp": 4})
    model = ComputeModel.from_profile(H100.profile, sp.dtype)
    per_msg = lambda cl, c: 5.0 + c.bytes / 1e5  # noqa: E731  (5 us latency per message)
    st = stage_times(sp, H100, model, per_msg)[0]
    msg = 2 * 512 * 1024 * 2
    k = 2 * 8 + 1 + 2 * 0  # two per layer forward, one for the vocab-parallel embedding (single stage: also logits in B)
    assert st.ar_F == pytest.approx(5.0 + k * msg / 1e5)
    assert st.F_tail - model.memory_us(4 * msg, kernels=1) == pytest.approx((k - 1) * 5.0)
    wl = build_transformer(sp, H100, collective_us=per_msg)
    assert wl.op("F0.s0.ar").collective == Collective("all_reduce", (0, 1, 2, 3), k * msg)
    assert wl.op("F0.s0.t2").duration_us + wl.op("F0.s0.end.t2").duration_us == pytest.approx(st.F)


def test_v_shaped_schedule_folds_stages_and_has_no_embedding_all_reduce():
    sp = spec(parallelism={"pp": 2, "vpp": 2, "schedule": "zb-v"})
    wl = build_transformer(sp, H100)
    assert wl.meta["stage_ranks"] == [0, 1, 1, 0]
    assert not any(o.startswith("EMB") for o in wl.ops)
    inter = build_transformer(spec(parallelism={"pp": 2, "vpp": 2}), H100)
    assert inter.meta["stage_ranks"] == [0, 1, 0, 1] and inter.meta["parallelism"]["schedule"] == "interleaved"


def test_distributed_optimizer_reduce_scatters_and_all_gathers():
    wl = build_transformer(spec(distributed_optimizer=True, parallelism={"dp": 4}), H100)
    assert wl.op("DP.p0.t0").collective.op == "reduce_scatter"
    ag = wl.op("AG.p0.t0").collective
    assert ag.op == "all_gather" and ag.group == (0, 1, 2, 3)
    assert all(wl.graph.has_edge(f"OPT.p0.d{d}", "AG.p0.t0") for d in range(4))


def test_full_recompute_holds_the_layer_working_set_during_backward():
    sp = spec(activation_recompute="full")
    c = stage_cost(sp, 0)
    assert c.backward_temp_bytes == (34 * 512 * 2 * 1024 + 5 * 16 * 512 * 512 * 2)
    assert c.B.flops > stage_cost(spec(), 0).B.flops  # the forward runs again
    # tp=2, no sequence parallelism: one layer's no-recompute set sbh(10 + 24/t + 5as/(ht)) = 42 sbh
    assert stage_cost(spec(activation_recompute="full", parallelism={"tp": 2}), 0).backward_temp_bytes == 44_040_192
    # selective: the attention scores 5as^2b/t = 5 * 16 * 512^2 * 2 / 2 = 20,971,520 during B
    assert stage_cost(spec(activation_recompute="selective", parallelism={"tp": 2}), 0).backward_temp_bytes == 20_971_520


def test_first_stage_peak_memory_under_1f1b_is_static_plus_pp_microbatches_in_flight():
    """Peak per GPU of pipeline rank 0, by hand: weights + gradients + optimizer + pp in-flight
    micro-batch activations + the selective-recompute working set of one backward."""
    from engine.core.comm import CommModel
    from engine.planners.pipeline_time import one_f_one_b_order, semi_active_plan
    from engine.planners.validate import peak_memory
    from simulator.simulate import simulate

    sp = spec(layers=4, global_batch=16, activation_recompute="selective", distributed_optimizer=True,
              parallelism={"tp": 2, "pp": 2, "dp": 2})
    assert sp.microbatches == 4
    # parameters on one GPU of stage 0 (2 layers), every layer weight split over t=2 as modelled:
    #   layer: QKV + proj 4h^2 + 4h, MLP 2hf + f + h, two norms 4h = 12h^2 + 13h = 12,596,224 (h=1024, f=4h)
    #   2 layers / t = 12,596,224; word embedding V h / t = 32000 * 1024 / 2 = 16,384,000;
    #   learned positions s h = 512 * 1024 = 524,288 (not split)  ->  29,504,512 parameters
    params = 29_504_512
    # bf16: 2 B weights + 4 B fp32 gradients + (4 B master + 4 B m + 4 B v) / dp with ZeRO-1 (dp=2)
    #   = 2 + 4 + 12/2 = 12 B per parameter = 354,054,144 B
    static = 354_054_144
    assert static == params * (2 + 4) + params * 12 // 2
    # activations of one micro-batch on stage 0 (s=512, b=2, h=1024, a=16, t=2, sbh = 1,048,576):
    #   2 layers x sbh(10 + 24/2) = 2 x 23,068,672 = 46,137,344, + embedding dropout mask and
    #   output 2sbh/t = 1,048,576  ->  47,185,920
    act = 47_185_920
    # selective recomputation: B re-creates the attention scores 5as^2b/t = 20,971,520 while it runs
    temp = 20_971_520
    # 1F1B: stage 0 holds pp = 2 micro-batches when it runs a backward (F0 F1 B0 W0 F2 B1 ...)
    peak = static + 2 * act + temp
    assert peak == 469_397_504  # 447.7 MiB
    wl = build_transformer(sp, H100)
    stage0 = [gpu_of(sp, d, 0, r) for d in range(2) for r in range(2)]
    assert stage0 == [0, 1, 4, 5]
    assert all(wl.static_memory_bytes[g] == static for g in stage0)
    comm = CommModel(H100)
    plan = semi_active_plan(wl, one_f_one_b_order(sp, wl), H100, comm)
    planned = peak_memory(plan, wl)
    assert [planned[g] for g in stage0] == [peak] * 4
    res = simulate(plan, wl, H100, timeline=False)
    assert [res.devices[g]["peak_memory_bytes"] for g in stage0] == [peak] * 4


@pytest.mark.parametrize("bad,match", [
    ({"hiden": 1024}, "did you mean 'hidden'"),
    ({"parallelism": {"tp": 3}}, "16 heads do not split over tp=3"),
    ({"parallelism": {"pp": 3}}, "8 layers do not split over pp x vpp = 3"),
    ({"global_batch": 7}, "not a multiple of micro_batch x dp"),
    ({"precision": "fp12"}, "precision: must be one of"),
    ({"activation_recompute": "some"}, "activation_recompute"),
    ({"parallelism": {"tpp": 2}}, "did you mean 'tp'"),
    ({"parallelism": {"schedule": "1f2b"}}, "schedule: must be one of"),
    ({"layers": 0}, "layers: must be an integer >= 1"),
])
def test_bad_specs_name_the_field(bad, match):
    raw = {**BASE, **bad}
    with pytest.raises(InputError, match=match):
        spec_from_dict(raw)


def test_scenario_errors_and_too_many_gpus():
    raw = {"workload": {**BASE, "parallelism": {"dp": 16}}, "cluster": {"profile": "h100-sxm"}}
    raw["workload"]["global_batch"] = 32
    with pytest.raises(InputError, match="tp x pp x dp = 16 GPUs but the cluster has 8"):
        scenario_from_dict(raw)
    raw = {"workload": {**BASE, "layers": None}, "cluster": {"profile": "h100-sxm"}}
    with pytest.raises(InputError, match="workload.layers"):
        scenario_from_dict(raw)


def test_shipped_scenario_plans_validates_and_simulates():
    from engine.planners.registry import plan_scenario
    from simulator.simulate import simulate

    sc = load_scenario(ROOT / "scenarios" / "transformer_gpt1b_h100.yaml")
    assert sc.workload.meta["parallelism"] == {"tp": 2, "pp": 2, "dp": 2, "vpp": 1, "schedule": "1f1b"}
    plan = plan_scenario(sc, "heuristic")
    res = simulate(plan, sc.workload, sc.cluster)
    assert res.makespan_us == pytest.approx(plan.makespan_us, rel=0.05)


def test_megatron_order_matches_the_closed_form_and_validates():
    from engine.planners.pipeline_time import iteration_time_1f1b, one_f_one_b_order, semi_active_plan, send_time_us

    comm = CommModel(H100)
    for par, gb in (({"pp": 4, "dp": 2}, 16), ({"pp": 2}, 16), ({"tp": 2, "pp": 2, "dp": 2}, 16)):
        sp = spec(global_batch=gb, parallelism=par)
        model = ComputeModel.from_profile(H100.profile, sp.dtype)
        from engine.workloads.transformer import simulator_collective_us as coll

        wl = build_transformer(sp, H100)
        plan = semi_active_plan(wl, one_f_one_b_order(sp, wl), H100, comm)
        assert validate_plan(plan, wl, H100, comm) == []
        st = stage_times(sp, H100, model, coll)
        closed = iteration_time_1f1b(st, step_end_times(sp, H100, model, coll), sp.microbatches,
                                     send_time_us(sp, H100, comm, st[0].cost.send_bytes))
        tol = 1e-9 if par.get("tp", 1) == 1 else 0.01
        assert closed == pytest.approx(plan.makespan_us, rel=tol), par
