"""Costs of a GPT-style transformer under tensor / pipeline / data parallelism.

Pure arithmetic, no graph: FLOPs from the layer shapes, times from a GPU's peak rate and an
efficiency model, bytes of communication and memory. :mod:`engine.workloads.transformer` turns these into
a workload; :mod:`engine.calibration.compute_fit` predicts iteration times from them.

Units: FLOPs, bytes (int where exact), us. ``b`` micro-batch, ``s`` sequence length, ``h``
hidden size, ``a`` attention heads, ``f`` MLP hidden size (4h by default), ``V`` vocabulary,
``t`` tensor-parallel size. All quantities are per GPU (a TP rank holds 1/t of every GEMM).

FLOPs per layer and micro-batch, forward (Megatron's count): GEMMs ``2bsh(3h + h + 2f)`` =
``24bsh^2`` for ``f = 4h`` plus attention ``4bs^2h``; the logits ``2bshV``. Backward: the input
gradient repeats every forward GEMM and twice the attention; the weight gradient repeats the
GEMMs. Activation memory per layer and micro-batch on one TP rank (Korthikanti et al. 2022,
Table 2, bytes for 16-bit activations; :func:`activation_bytes_per_layer`). The workload models
TP without sequence parallelism: the layer norms, dropouts and residuals see the whole
replicated ``s x b x h`` tensor, only the attention and MLP internals split over ``t``:
``sbh(10 + 24/t + 5as/(ht))`` without recomputation, ``sbh(10 + 24/t)`` with selective
recomputation, ``2sbh`` with full recomputation (the layer input only). With sequence
parallelism (``sequence_parallel=True``, not a scenario option) everything splits:
``sbh(34 + 5as/h)/t``, ``34sbh/t``, ``2sbh/t``.

Time of a GEMM of ``F`` FLOPs: ``(F + F_half) / (peak x efficiency)`` — efficiency
``efficiency x F / (F + F_half)``, half of the best at ``F_half`` FLOPs (small GEMMs fill the GPU
poorly). Element-wise work (layer norms, dropout, softmax, GeLU, residuals) moves about twice the
activation bytes a TP rank touches, ``sbh(10 + 24/t + 5as/(ht))`` (the no-recomputation
activations above), through HBM at ``hbm x memory_efficiency``
and launches ``ELEMENTWISE_KERNELS`` kernels of ``kernel_overhead_us`` each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PRECISIONS = {  # precision -> (peak-rate dtype of the profile, activation/weight bytes, gradient bytes)
    "fp32": ("fp32", 4, 4), "tf32": ("tf32", 4, 4), "fp16": ("fp16", 2, 2),
    "bf16": ("bf16", 2, 4),  # Megatron accumulates and all-reduces bf16 gradients in fp32
    "fp8": ("fp8", 2, 4),    # FP8 GEMMs, bf16 activations between them
}
RECOMPUTE = ("none", "selective", "full")
SPLIT_BACKWARD = ("zb-h1", "zb-h2", "zb-v", "dualpipe", "dualpipev")  # W may wait; gradients leave after B
V_SHAPED = ("zb-v", "dualpipev")  # virtual stages fold back: chunk 1 of rank r is stage 2p-1-r
# Element-wise kernels per layer and phase (norms, dropouts, softmax, GeLU, residual adds, bias).
ELEMENTWISE_KERNELS = {"F": 12, "B": 16, "W": 0}
# Adam with mixed precision touches ~32 bytes per parameter (fp32 master, m, v read+write, grads, copy).
OPTIMIZER_BYTES_PER_PARAM = 32


@dataclass(frozen=True)
class Parallelism:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1
    schedule: str = "1f1b"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class TransformerSpec:
    """A GPT-style model and one training iteration's batch and parallelism (validated by
    :func:`engine.workloads.transformer.spec_from_dict`)."""

    layers: int
    hidden: int
    heads: int
    seq_len: int
    vocab: int
    global_batch: int
    micro_batch: int
    precision: str = "bf16"
    activation_recompute: str = "none"
    parallelism: Parallelism = field(default_factory=Parallelism)
    ffn_hidden: int | None = None
    distributed_optimizer: bool = False

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.hidden

    @property
    def microbatches(self) -> int:
        """Micro-batches per pipeline per iteration: global / (micro x dp)."""
        return self.global_batch // (self.micro_batch * self.parallelism.dp)

    @property
    def stages(self) -> int:
        """Virtual pipeline stages: pp x vpp."""
        return self.parallelism.pp * self.parallelism.vpp

    @property
    def dtype(self) -> str:
        return PRECISIONS[self.precision][0]

    @property
    def elem_bytes(self) -> int:
        return PRECISIONS[self.precision][1]

    @property
    def grad_bytes(self) -> int:
        return PRECISIONS[self.precision][2]

    def stage_rank(self, stage: int) -> int:
        """The pipeline rank (0..pp-1) that holds virtual stage ``stage``."""
        p = self.parallelism.pp
        chunk, pos = divmod(stage, p)
        if self.parallelism.schedule in V_SHAPED and chunk % 2 == 1:
            return p - 1 - pos
        return pos

    def stage_layers(self, stage: int) -> int:
        return self.layers // self.stages


@dataclass(frozen=True)
class ComputeModel:
    """How fast one GPU runs the model's kernels (see the module docstring).

    ``peak_flops_per_us``: FLOP/us; ``efficiency``: best share of peak a GEMM reaches;
    ``gemm_half_flops``: GEMM size (FLOPs) at half that share; ``hbm_bytes_per_us`` and
    ``memory_efficiency``: element-wise bandwidth; ``kernel_overhead_us``: per element-wise kernel.
    """

    peak_flops_per_us: float
    efficiency: float = 0.5
    gemm_half_flops: float = 0.0
    hbm_bytes_per_us: float = 2.0e6
    memory_efficiency: float = 0.7
    kernel_overhead_us: float = 0.0

    @classmethod
    def from_profile(cls, profile: Any, dtype: str) -> "ComputeModel":
        """The model a hardware profile describes (its optional compute fields default as above)."""
        gpu = profile.gpu
        return cls(peak_flops_per_us=profile.peak_flops_per_us(dtype), efficiency=gpu.compute_efficiency,
                   gemm_half_flops=float(getattr(gpu, "gemm_half_flops", 0.0)),
                   hbm_bytes_per_us=gpu.hbm_bytes_per_us,
                   memory_efficiency=float(getattr(gpu, "memory_efficiency", 0.7)),
                   kernel_overhead_us=float(getattr(gpu, "kernel_overhead_us", 0.0)))

    def gemm_us(self, flops: float) -> float:
        """Time of one GEMM (or batched matmul) of ``flops`` FLOPs."""
        return 0.0 if flops <= 0 else (flops + self.gemm_half_flops) / (self.peak_flops_per_us * self.efficiency)

    def memory_us(self, nbytes: float, kernels: int = 0) -> float:
        """Time of element-wise kernels moving ``nbytes`` through HBM, ``kernels`` launches."""
        return nbytes / (self.hbm_bytes_per_us * self.memory_efficiency) + kernels * self.kernel_overhead_us


@dataclass(frozen=True)
class PhaseCost:
    """One phase (F, B or W) of one virtual stage for one micro-batch, on one GPU.

    ``gemm_flops``: the GEMMs' FLOPs one by one; ``memory_bytes``: element-wise HBM traffic;
    ``kernels``: element-wise launches; ``tp_messages``: TP all-reduces of ``tp_bytes`` each."""

    gemm_flops: tuple[float, ...]
    memory_bytes: float
    kernels: int
    tp_messages: int

    @property
    def flops(self) -> float:
        return float(sum(self.gemm_flops))

    def compute_us(self, model: ComputeModel) -> float:
        return sum(model.gemm_us(f) for f in self.gemm_flops) + model.memory_us(self.memory_bytes, self.kernels)


@dataclass(frozen=True)
class StageCost:
    """Per GPU costs of virtual stage ``stage`` for one micro-batch (bytes, FLOPs)."""

    stage: int
    layers: int
    F: PhaseCost
    B: PhaseCost
    W: PhaseCost
    activation_bytes: int   # held from F's start to W's end
    backward_temp_bytes: int  # recomputation working set during B
    params: int             # parameters on one GPU for this stage
    send_bytes: int         # activation (or gradient) one TP rank sends to the next stage


def layer_params(spec: TransformerSpec) -> int:
    """Parameters of one transformer layer (whole, not divided by TP)."""
    h, f = spec.hidden, spec.ffn
    return 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h


def activation_bytes_per_layer(spec: TransformerSpec, recompute: str | None = None,
                               sequence_parallel: bool = False) -> int:
    """Korthikanti et al. (Table 2) activation bytes of one layer and micro-batch on one TP rank,
    16-bit activations, with ``recompute`` (default: the spec's ``activation_recompute``).

    Without sequence parallelism (what the workload models) ``10sbh`` — the two layer-norm
    inputs (4sbh), the layer-norm outputs feeding the QKV and MLP-up GEMMs (4sbh) and the two
    dropout masks after attention and MLP (2sbh) — is replicated on every TP rank and only the
    rest, ``24sbh + 5as^2b``, splits over ``t``; with it the whole ``34sbh + 5as^2b`` splits.
    The one place the layer activation formula lives: :func:`stage_cost` derives from it."""
    s, b, h, a, t = spec.seq_len, spec.micro_batch, spec.hidden, spec.heads, spec.parallelism.tp
    recompute = spec.activation_recompute if recompute is None else recompute
    sbh = s * b * h
    scores = 5 * a * s * s * b  # softmax output, its dropout mask, the dropout output (attention over values)
    if sequence_parallel:
        per = {"none": (34 * sbh + scores) // t, "selective": 34 * sbh // t, "full": 2 * sbh // t}
    else:
        per = {"none": 10 * sbh + (24 * sbh + scores) // t, "selective": 10 * sbh + 24 * sbh // t,
               "full": 2 * sbh}
    return per[recompute]


def total_params(spec: TransformerSpec) -> int:
    """Parameters of the whole model (embeddings tied, learned positions)."""
    return spec.layers * layer_params(spec) + spec.vocab * spec.hidden + spec.seq_len * spec.hidden + 2 * spec.hidden


def model_flops_per_iteration(spec: TransformerSpec) -> float:
    """Useful FLOPs of one iteration (forward + backward, no recomputation), the MFU numerator."""
    b, s, h, V = spec.global_batch, spec.seq_len, spec.hidden, spec.vocab
    per_layer = 2 * b * s * h * (4 * h + 2 * spec.ffn) + 4 * b * s * s * h
    return 3.0 * (spec.layers * per_layer + 2 * b * s * h * V)


def stage_cost(spec: TransformerSpec, stage: int) -> StageCost:
    """Costs of virtual stage ``stage`` (embedding on the first, logits and loss on the last)."""
    s, b, h, V, t = spec.seq_len, spec.micro_batch, spec.hidden, spec.vocab, spec.parallelism.tp
    n = spec.stage_layers(stage)
    m = b * s  # tokens per micro-batch
    e = spec.elem_bytes
    layer_gemms = (2 * m * h * 3 * h / t, 2 * m * h * h / t, 2 * m * h * spec.ffn / t, 2 * m * spec.ffn * h / t)
    attn = (2 * b * s * s * h / t, 2 * b * s * s * h / t)  # scores and scores x values
    act_full = activation_bytes_per_layer(spec, "none")  # 16-bit bytes, no recomputation
    scores_bytes = act_full - activation_bytes_per_layer(spec, "selective")  # 5as^2b/t: what selective drops
    # element-wise traffic ~ twice the activation bytes a TP rank touches (the norms, dropouts
    # and residuals work on the whole replicated s x b x h tensor). Those bytes are for 2-byte elements.
    mem_f = float(act_full * e)
    f_gemms = layer_gemms * n + attn * n
    b_gemms = layer_gemms * n + attn * 2 * n
    w_gemms = layer_gemms * n
    b_mem, b_kern = 2.0 * mem_f * n, ELEMENTWISE_KERNELS["B"] * n
    if spec.activation_recompute == "full":
        b_gemms += f_gemms
        b_mem += mem_f * n
        b_kern += ELEMENTWISE_KERNELS["F"] * n
    elif spec.activation_recompute == "selective":
        b_gemms += attn * n
        b_mem += float(scores_bytes * e * n)
        b_kern += 3 * n  # softmax, mask, dropout
    f_mem, f_kern = mem_f * n, ELEMENTWISE_KERNELS["F"] * n
    f_msgs, b_msgs = 2 * n, 2 * n
    params = n * layer_params(spec) // t
    first, last = stage == 0, stage == spec.stages - 1
    if first:  # embedding lookup (vocab-parallel: all-reduce of the output under TP)
        f_mem += 3.0 * m * h * e
        f_kern += 2
        f_msgs += 1
        params += (V * h) // t + s * h
    extra_act = 0
    if last:  # final norm, logits (vocab-parallel), fp32 cross-entropy
        logits = 2.0 * m * h * V / t
        f_gemms += (logits,)
        b_gemms += (logits,)
        w_gemms += (logits,)
        ce_bytes = 4.0 * m * V / t
        f_mem += 2 * ce_bytes + 3.0 * m * h * e
        b_mem += 2 * ce_bytes + 3.0 * m * h * e
        f_kern += 4
        b_kern += 4
        b_msgs += 1
        extra_act = int(ce_bytes) + 2 * m * h // t
        if spec.stage_rank(stage) != spec.stage_rank(0):
            params += (V * h) // t  # the output layer's copy of the tied embedding
        params += 2 * h
    act = n * activation_bytes_per_layer(spec) * e // 2 + extra_act
    if first:
        act += 2 * m * h // t  # embedding dropout mask and output
    temp = {"none": 0, "selective": scores_bytes * e // 2,
            "full": act_full * e // 2}[spec.activation_recompute] if n else 0
    return StageCost(stage=stage, layers=n,
                     F=PhaseCost(tuple(f_gemms), f_mem, f_kern, f_msgs if t > 1 else 0),
                     B=PhaseCost(tuple(b_gemms), b_mem, b_kern, b_msgs if t > 1 else 0),
                     W=PhaseCost(tuple(w_gemms), 0.0, ELEMENTWISE_KERNELS["W"] * n, 0),
                     activation_bytes=int(act), backward_temp_bytes=int(temp), params=int(params),
                     send_bytes=(m * h * e) // t)


def static_memory_breakdown(spec: TransformerSpec, params: int) -> dict[str, int]:
    """Bytes of ``params`` parameters on one GPU: ``weights``, ``grads``, ``optimizer``.

    As Megatron keeps them: 16-bit weights (2 B/param; fp32/tf32: 4), fp32 main gradients
    (4 B/param, ``PRECISIONS``), Adam with an fp32 master copy + m + v (12 B/param; fp32 training:
    m + v, 8 B). So bf16 = 18 B/param; with the distributed optimizer (ZeRO-1) the optimizer
    states are sharded over dp: 6 + 12/dp B/param (Megatron's distributed-optimizer doc)."""
    opt = (12 if spec.elem_bytes == 2 else 8) * params
    if spec.distributed_optimizer:
        opt //= spec.parallelism.dp
    return {"weights": params * spec.elem_bytes, "grads": params * spec.grad_bytes, "optimizer": opt}


def static_memory_bytes(spec: TransformerSpec, params: int) -> int:
    """Weights + gradients + optimizer states of ``params`` parameters on one GPU (bytes)."""
    return sum(static_memory_breakdown(spec, params).values())


def optimizer_us(spec: TransformerSpec, params: int, model: ComputeModel) -> float:
    """Adam step over ``params`` parameters on one GPU (memory-bound)."""
    local = params / spec.parallelism.dp if spec.distributed_optimizer else params
    return model.memory_us(OPTIMIZER_BYTES_PER_PARAM * local, kernels=4)
