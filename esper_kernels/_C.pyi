"""esper_kernels._C: the C++/CUDA extension (csrc/bindings.cpp). Plain integers and floats only: data pointers,
element strides, dtype codes (csrc/ppo_params.h enum DType) and the resolved config; no torch types."""

MAX_HEADS: int
GLOBAL_SIZE: int
HEAD_SIZE: int
LAYOUT_FINGERPRINT: str  # esper_kernels.schema.fingerprint() of the layout the extension was built from
has_cuda: bool
CUDA_STEP_ROWS: int

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
    def set_head(self, h: int, *, logits: int, logits_rs: int, masks: int, masks_rs: int, actions: Vec,
                 old_lp: Vec, rel: Vec, adv: Vec) -> None: ...
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
def cuda_status() -> str: ...
def cuda_forward(params: Params, aux: int, parts: int, stream: int, device: int) -> None: ...
def cuda_backward(params: Params, stream: int, device: int) -> None: ...
def cuda_derive_metrics(cfg: MetricsCfg, stats: int, out: int, stream: int, device: int) -> None: ...
