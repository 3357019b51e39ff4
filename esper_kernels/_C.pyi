"""esper_kernels._C: the C++/CUDA extension (csrc/bindings.cpp). Plain integers and floats only: data pointers,
element strides, dtype codes (csrc/ppo_params.h enum DType) and the resolved config; no torch types."""

MAX_HEADS: int
GLOBAL_SIZE: int
HEAD_SIZE: int
LAYOUT_FINGERPRINT: str  # esper_kernels.schema.fingerprint() of the layout the extension was built from
has_cuda: bool

Vec = tuple[int, int, int]  # (pointer, element stride, dtype code); (0, 0, 0) = not given
Mat = tuple[int, int, int, int]  # (pointer, stride 0, stride 1, dtype code)

class Params:
    """One call's parameters, field by field (csrc/ppo_params.h PPOParams has a comment per field)."""

    n: int
    num_heads: int
    max_size: int  # read-only: set by check() from sizes
    logits_dtype: int
    has_mask: int
    has_rel: int
    per_head: int
    adv_per_head: int
    normalize_entropy: int
    has_values: int
    has_vclip: int
    has_jclamp: int
    mask_exclude: int
    normalize_adv: int
    adv_std_unbiased: int
    adv_eps_add: int
    eps_low: float
    eps_high: float
    log_clamp: float
    joint_clamp: float
    entropy_coef: float
    value_coef: float
    value_clip: float
    mask_fill: float
    adv_eps: float
    sizes: list[int]
    floor: list[float]
    kcoef: list[float]
    weights: Vec
    values: Vec
    returns: Vec
    old_values: Vec
    value_weights: Vec
    grad_losses: Vec
    grad_log_probs: Mat
    grad_entropy: Mat
    losses: int
    log_probs: int
    entropy: int
    joint_ratio: int
    stats: int
    saved: int
    adv_norm: int
    grad_values: int

    def __init__(self) -> None: ...
    def copy(self) -> Params: ...
    def set_head(
        self,
        h: int,
        *,
        logits: int,
        logits_rs: int,
        masks: int,
        masks_rs: int,
        actions: Vec,
        old_lp: Vec,
        rel: Vec,
        adv: Vec,
    ) -> None: ...
    def set_columns(self, field: str, ptr: int, row_stride: int, col_stride: int, dtype: int) -> None:
        """Every head's column of one [N, H] matrix ("actions", "old_lp", "rel" or "adv"; col_stride 0: one
        vector shared by all heads)."""
        ...
    def set_packed(self, field: str, ptr: int, row_stride: int, elem_size: int) -> None:
        """Every head's block of packed [N, S] "logits", "masks" or "grads" (offsets from ``sizes``)."""
        ...
    def set_grad(self, h: int, ptr: int, rs: int) -> None: ...
    def head(self, h: int) -> dict[str, object]: ...

class MetricsCfg:
    """What the metric table needs besides the statistics (csrc/ppo_metrics.h)."""

    num_heads: int
    per_head: int
    has_values: int
    has_vclip: int
    ratio_std_unbiased: int
    entropy_coef: float
    value_coef: float
    kcoef: list[float]

    def __init__(self) -> None: ...

def check(params: Params) -> None: ...
def cpu_forward(params: Params, nthreads: int, vectorise: bool = True) -> None: ...
def cpu_backward(params: Params, nthreads: int, vectorise: bool = True) -> None: ...
def derive_metrics(cfg: MetricsCfg, stats: int, out: int) -> None: ...

# the one-pass CUDA kernels (csrc/ppo_onepass.h, csrc/ppo_cuda.cu). A plan says the launch's shapes and the
# scratch the caller allocates: norms float32 [norms_size], pre_parts float32 [grid_pre * pre_size], parts float32
# [nparts * stats_size], ctl 2 uint32 (tickets, zeroed by the pre-pass), table float32 [metrics_size] or 0, gv
# float32 [N] (d loss / d values) or 0. The forward writes d loss / d logits for an upstream of 1 on `loss` into
# params' gradient pointers when write_grad; the backward (the fix-up) reads grad_losses and params.grad_log_probs /
# grad_entropy on the device and returns at once, rescales in place, or recomputes (force_recompute: the buffers
# hold nothing yet). grad_losses: pointers to the float32 incoming gradients of loss, policy_loss, entropy_loss and
# value_loss (0 where none).
Plan = dict[str, object]  # path, grid_pre, grid_main, nparts, rows, cluster, chunk, smem, segments, *_size

# the same kernels' code on the CPU, block by block (the host emulation; machine shapes as keywords)
def onepass_plan(
    params: Params,
    *,
    fixup: bool,
    write_grad: bool,
    sm_count: int = 132,
    cc_major: int = 9,
    smem_optin: int = ...,
    smem_per_sm: int = ...,
    max_blocks: int = 0,
) -> Plan: ...
def onepass_host_forward(
    params: Params,
    mcfg: MetricsCfg,
    *,
    write_grad: bool,
    norms: int,
    pre_parts: int,
    parts: int,
    ctl: int,
    table: int,
    gv: int,
    sm_count: int = 132,
    cc_major: int = 9,
    smem_optin: int = ...,
    smem_per_sm: int = ...,
    max_blocks: int = 0,
) -> None: ...
def onepass_host_backward(
    params: Params,
    *,
    write_grad: bool,
    force_recompute: bool,
    norms: int,
    ctl: int,
    gv: int,
    grad_losses: tuple[int, int, int, int],
    sm_count: int = 132,
    cc_major: int = 9,
    smem_optin: int = ...,
    smem_per_sm: int = ...,
    max_blocks: int = 0,
) -> None: ...

# CUDA (has_cuda): on `stream` under `device`
def cuda_status() -> str: ...
def cuda_onepass_plan(params: Params, device: int, *, fixup: bool, write_grad: bool, max_blocks: int = 0) -> Plan: ...
def cuda_onepass_forward(
    params: Params,
    mcfg: MetricsCfg,
    *,
    write_grad: bool,
    norms: int,
    pre_parts: int,
    parts: int,
    ctl: int,
    table: int,
    gv: int,
    stream: int,
    device: int,
    max_blocks: int = 0,
) -> None: ...
def cuda_onepass_backward(
    params: Params,
    *,
    write_grad: bool,
    force_recompute: bool,
    norms: int,
    ctl: int,
    gv: int,
    grad_losses: tuple[int, int, int, int],
    stream: int,
    device: int,
    max_blocks: int = 0,
) -> None: ...
def cuda_derive_metrics(cfg: MetricsCfg, stats: int, out: int, stream: int, device: int) -> None: ...
