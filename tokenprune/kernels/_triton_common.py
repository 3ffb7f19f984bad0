"""What the Triton kernel modules share: buffer allocation, sizes, launch settings, and the small
``@triton.jit`` helpers several kernels inline (ranking, token rows and sizes, the source map, the running
argmax over column tiles).

The kernels themselves live by op family: ``attention.py`` (linear and key-bias attention), ``scores.py``
(one query row), ``merge.py`` (ToMe: matching, merged rows, the merge step, row gather), ``keep.py``
(keep the k best) and ``apet.py`` (ApET: errors, Gram matrix, stage, assignment, merge). Each launcher has
the signature and outputs of its PyTorch reference in ``reference.py``; NOTES.md counts their bytes and FLOPs.
These modules import ``triton`` at import time: the package imports them lazily (``kernels._impl``).
"""
from __future__ import annotations

import functools
import inspect
import operator

import torch
import triton
import triton.language as tl

POISON = False  # fill every buffer a kernel writes with NaN / -7 first (correctness checks: all written?)


def _alloc(shape, device, dtype):
    """An output buffer (NaN / -7 filled with ``POISON``: the tests then see any element a kernel left unwritten).
    The sizes go to ``torch.empty`` one by one: a tuple costs its argument parser about 0.7 us more per call."""
    if not POISON:
        return torch.empty(*shape, device=device, dtype=dtype)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -7, device=device, dtype=dtype)


def _workspace(scratch, key, device, needs: tuple, dtypes: tuple) -> tuple:
    """Scratch buffers of a step's kernels (written before they are read, never returned): flat tensors of at least
    ``needs[i]`` elements of ``dtypes[i]`` (0: not needed, another buffer stands in). Kept in ``scratch`` (the caller's
    dict for one forward, ``TokenState.scratch``) under ``key``, so the later steps of that forward reuse them: batch 1
    is bound by host time, and an allocation costs microseconds of it. A forward's kernels run in stream order, so one
    step's launches never overlap the next one's. Without a dict, fresh ones."""
    ws = scratch.get(key) if scratch is not None else None
    if ws is not None and ws[0] == device and all(map(operator.le, needs, ws[1])):
        return ws[2]
    old = ws is not None and ws[0] == device
    caps, bufs, stand = list(ws[1]) if old else [0] * len(needs), list(ws[3]) if old else [None] * len(needs), None
    for i in range(len(needs)):
        if needs[i] > caps[i]:
            bufs[i], caps[i] = torch.empty(needs[i], device=device, dtype=dtypes[i]), needs[i]
        stand = bufs[i] if stand is None else stand
    out = tuple([stand if b is None else b for b in bufs])
    if scratch is not None:
        scratch[key] = (device, tuple(caps), out, bufs)
    return out


class _Launcher:
    """``fast(kernel)[grid](*args, **kwargs)``: ``kernel[grid](...)`` with less host time per call.

    Triton's own launch binds and specializes every argument on each call (tens of microseconds for these
    kernels' 20-40 arguments; at batch 1 a forward is bound by such host time). This keeps, per key, the
    compiled kernel Triton chose, and calls its launcher directly. The key holds everything Triton
    specializes on, and more: each tensor's dtype and address modulo 16 (Triton: 16-byte aligned or not),
    every other argument's value (ints, so ``== 1`` and ``% 16``; flags, floats, constexprs), the launch
    options (every keyword argument), the grid and the device. A new key takes Triton's own path once
    (compiling if needed, and checking its globals), which returns the compiled kernel for the cache.
    Which arguments are tensors is learnt from the first call; a later call with something else in a tensor's
    place (None, a number) is keyed on every value as it is. Values are compared as Python compares them, so a
    call site passes each argument as one type (``1``, ``1.0`` and ``True`` are one key; Triton would type them
    apart). Launch hooks (profilers such as proton) and the interpreter always take Triton's path."""

    def __init__(self, fn):
        self.fn = fn
        self.interpreted = _interpreted(fn)
        params = list(inspect.signature(fn.fn).parameters.values())
        self.names = [p.name for p in params]
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.rest: dict = {}  # number of positional arguments -> getter of the others from the keyword dict
        self.split = None  # (tensor positions, other positions) as getters, from the first call
        self.cache: dict = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _full(self, args, kwargs) -> tuple:
        """Every argument in signature order: the positional ones, then the keywords and defaults."""
        rest = self.rest.get(len(args))
        if rest is None:
            rest = self.rest[len(args)] = _getter(self.names[len(args):])
        return args + rest({**self.defaults, **kwargs} if self.defaults else kwargs)

    def _key(self, dev, grid, full, kwargs) -> tuple:
        split = self.split
        if split is None:
            tpos = [i for i, a in enumerate(full) if isinstance(a, torch.Tensor)]
            split = self.split = (_getter(tpos), _getter([i for i in range(len(full)) if i not in tpos]))
        tensors = split[0](full)
        try:
            return (dev, tuple(grid), tuple(kwargs.items()), split[1](full), tuple([t.dtype for t in tensors]),
                    tuple([t.data_ptr() & 15 for t in tensors]))
        except AttributeError:  # a tensor's place holds something else: key on every value as it is
            return (dev, tuple(grid), tuple(kwargs.items()),
                    tuple([(a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor) else a for a in full]))

    def launch(self, grid, args, kwargs):
        if self.interpreted or _hooks_active():
            return self.fn[grid](*args, **kwargs)
        full = self._full(args, kwargs)
        dev = torch.cuda.current_device()
        key = self._key(dev, grid, full, kwargs)
        kernel = self.cache.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **kwargs)
            if hasattr(kernel, "result"):  # an asynchronous compile (Triton 3.6+)
                kernel = kernel.result()
            self.cache[key] = kernel
            return kernel
        g = (tuple(grid) + (1, 1))[:3]
        kernel.run(g[0], g[1], g[2], _stream(dev), kernel.function, kernel.packed_metadata, None,
                   _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook, *full)
        return kernel


def _getter(positions):
    """A function returning the items at ``positions`` (indices or keys) of a sequence or dict as a tuple (also
    for 0 or 1 positions)."""
    if not positions:
        return lambda seq: ()
    if len(positions) == 1:
        i = positions[0]
        return lambda seq: (seq[i],)
    return operator.itemgetter(*positions)


_knobs = getattr(triton, "knobs", None)
try:
    from torch._C import _cuda_getCurrentRawStream as _stream
except ImportError:  # pragma: no cover -- older torch
    def _stream(dev):
        return torch.cuda.current_stream(dev).cuda_stream


def _hooks_active() -> bool:
    """Whether a launch hook is installed (Triton then needs its launch metadata): take Triton's own path."""
    if _knobs is None:
        return True
    hook = _knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


class Slot(int):
    """In a :class:`LaunchPlan`'s arguments: the tensor at this index of the tuple the plan is called with."""


def _alignment(t, check) -> tuple:
    """The compiled-kernel key of a launch: the address modulo 16 of the tensors at the indices ``check`` of ``t``."""
    return tuple([t[i].data_ptr() & 15 for i in check])


class LaunchPlan:
    """One launch with its grid, launch options and every argument but the tensors fixed: what a launcher works out
    from an input signature (shapes, strides, dtypes, flags) once, kept by the launcher per signature (batch 1 is
    bound by host time: a launch through ``fast`` rebuilds and hashes a 60-value key per call).

    ``plan(t)`` launches ``kernel`` with its leading tensor parameters taken from the tuple ``t`` at the indices
    ``take`` and the rest from ``args`` / ``kwargs`` (ints, flags, constexprs, launch options). The compiled kernel is
    looked up by the 16-byte alignment of the tensors at the indices ``check`` only (the inputs): the others are fresh
    outputs of ``_alloc`` (the caching allocator's blocks are aligned), trusted. Without ``fast``'s cached launcher
    (``FAST_LAUNCH`` off, a stand-in kernel), interpreted, or with a launch hook, it takes ``fast``'s path. The
    compiled kernel gets the tensors as their addresses (ints): Triton's launcher then skips, per tensor, its
    ``data_ptr`` call and the driver's pointer query (``cuPointerGetAttribute``)."""

    __slots__ = ("kernel", "grid", "g3", "take", "args", "kwargs", "check", "launcher", "kernels", "tail")

    def __init__(self, kernel, grid, take, args, kwargs, check):
        self.kernel, self.grid, self.args, self.kwargs, self.check = kernel, tuple(grid), tuple(args), kwargs, check
        self.g3 = (self.grid + (1, 1))[:3]
        self.take = _getter(list(take))
        self.launcher, self.kernels, self.tail = None, {}, None

    def __call__(self, t):
        tensors = self.take(t)
        launcher = fast(self.kernel)
        if type(launcher) is not _Launcher or launcher.interpreted or _hooks_active():
            return launcher[self.grid](*tensors, *self.args, **self.kwargs)
        if launcher is not self.launcher:  # (a new launcher: FAST_LAUNCH toggled, the dry-host harness)
            self.launcher, self.kernels = launcher, {}
            self.tail = launcher._full(tensors + self.args, self.kwargs)[len(tensors):]
        key = _alignment(t, self.check)
        kernel = self.kernels.get(key)
        if kernel is None:  # fast's path: compiles if needed, launches, returns the kernel
            self.kernels[key] = launcher.launch(self.grid, tensors + self.args, self.kwargs)
            return
        g = self.g3
        kernel.run(g[0], g[1], g[2], _stream(torch.cuda.current_device()), kernel.function, kernel.packed_metadata,
                   None, _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook,
                   *[a.data_ptr() for a in tensors], *self.tail)


class LaunchGroup:
    """Launch plans called in order on one tuple (a step's launches), with what they share worked out once per call
    instead of once per launch: the launch-hook and launcher checks, the inputs' alignment key, the stream. The first
    call of an alignment key runs each plan as it is, then keeps their compiled kernels; a later call takes that path
    again whenever a plan would not take its fast path (a launch hook, ``FAST_LAUNCH`` off, the interpreter, a new
    launcher). Every tensor's address is read once per call, and the kernels get addresses (as ``LaunchPlan``)."""

    __slots__ = ("plans", "check", "runs", "launcher")

    def __init__(self, plans):
        self.plans = tuple(plans)
        self.check = tuple(sorted({i for p in self.plans for i in p.check}))
        self.runs: dict = {}  # the inputs' alignment key -> per plan (kernel, tensor getter, grid, other arguments)
        self.launcher = None  # the first plan's launcher when ``runs`` was filled (a new one empties it)

    def __call__(self, t):
        ptrs = [a.data_ptr() for a in t]
        key = tuple([ptrs[i] & 15 for i in self.check])
        runs = self.runs.get(key)
        if runs is None or _hooks_active() or fast(self.plans[0].kernel) is not self.launcher:
            for plan in self.plans:
                plan(t)
            return self._learn(t, key)
        stream = _stream(torch.cuda.current_device())
        enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
        for kernel, take, g, tail in runs:
            kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, None, enter, leave,
                       *take(ptrs), *tail)

    def _learn(self, t, key):
        runs = []
        for plan in self.plans:
            kernel = plan.kernels.get(_alignment(t, plan.check))
            if plan.launcher is None or fast(plan.kernel) is not plan.launcher or kernel is None:
                return  # this call took Triton's own path somewhere: nothing to keep
            runs.append((kernel, plan.take, plan.g3, plan.tail))
        launcher = self.plans[0].launcher  # (the check above: fast() still returns it)
        if self.launcher is not launcher:
            self.runs, self.launcher = {}, launcher
        self.runs[key] = tuple(runs)


MAX_PLANS = 1024  # launch plans kept per op (then all dropped: a model sees a handful of input signatures)


def cached_plan(plans: dict, key, build, *args):
    """The plan for the input signature ``key`` in ``plans`` (one dict per op), built as ``build(*args)`` on a miss."""
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= MAX_PLANS:
            plans.clear()
        plan = plans[key] = build(*args)
    return plan


_LAUNCHERS: dict = {}
FAST_LAUNCH = True  # False: every launch takes Triton's own path (benchmarks compare the two)


def fast(kernel) -> _Launcher:
    """The cached launcher of a ``@triton.jit`` kernel (see ``_Launcher``); ``fast(k)[grid](...)`` launches it."""
    if not FAST_LAUNCH:
        return kernel
    launcher = _LAUNCHERS.get(id(kernel))  # by id: a JIT function's own hash is Python code (about 0.5 us)
    if launcher is None:
        if not hasattr(kernel, "fn"):  # not a JIT function (a test's stand-in): launched as it is
            return kernel
        launcher = _LAUNCHERS[id(kernel)] = _Launcher(kernel)  # holds the kernel: its id is never reused
    return launcher


def _p2(n: int) -> int:
    """The next power of two >= n (at least 1); plain Python (``triton.next_power_of_2`` is a constexpr function
    that costs microseconds per host call)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code (``triton.cdiv`` is a constexpr function, slow on the host)."""
    return -(-a // b)


_SMS: dict = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 4
    sms = _SMS.get(device.index)
    if sms is None:  # cached: the properties call costs microseconds on every launch
        sms = _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return sms


def _interpreted(kernel) -> bool:
    """True under TRITON_INTERPRET=1 (the interpreter takes no compiler options such as maxnreg)."""
    return type(kernel).__name__ == "InterpretedFunction"


@triton.jit
def _rank_desc(vals, offs, row_ptr, N, BT: tl.constexpr):
    # rank of each value among the N values at row_ptr: how many come first by (value desc, index asc);
    # vals[i] is the value at index offs[i] of that row, counted against it in tiles of BT (unrolled by 4 in
    # session 8: nothing measurable in run 15, reverted)
    rank = tl.zeros(vals.shape, tl.int32)
    for t0 in range(0, N, BT):
        ot = t0 + tl.arange(0, BT)
        om = ot < N
        st = tl.load(row_ptr + ot, mask=om, other=float("-inf")).to(tl.float32)
        ahead = (st[None, :] > vals[:, None]) | ((st[None, :] == vals[:, None]) & (ot[None, :] < offs[:, None]))
        rank += tl.sum((ahead & om[None, :]).to(tl.int32), 1)
    return rank


# whether this module's kernels run in the interpreter (TRITON_INTERPRET=1 when it was imported); kernels read it
_INTERPRETED: tl.constexpr = tl.constexpr(_interpreted(_rank_desc))


@triton.jit
def _order_keys(vals, offs):
    # each value (one row, in registers; -inf at padding, whose offs are past the row) as a 64-bit key that sorts
    # ascending by (value desc, index asc): the float's bits made order-preserving and inverted, the index below them;
    # -0.0 counts as 0.0, NaN (either sign) first, as torch.topk. The keys are distinct (the index is in them)
    v = vals.to(tl.float32)
    v = tl.where(v == 0.0, 0.0, tl.where(v != v, float("nan"), v))
    i = v.to(tl.int32, bitcast=True)
    asc = tl.where(i < 0, i ^ 0x7FFFFFFF, i)  # signed order of these ints = the floats' order
    return ((~asc).to(tl.int64) << 32) | offs.to(tl.int64)  # ~: descending in the value, then the index


@triton.jit
def _top_k_mask(vals, offs, K):
    # which of the values are among the K first by (value desc, index asc), without reading the row back: the keys
    # (_order_keys) are sorted in registers (bitonic) and the K-th smallest is the threshold. Same set as
    # _rank_desc(...) < K
    key = _order_keys(vals, offs)
    first = tl.arange(0, key.shape[0]) < K
    kth = tl.max(tl.where(first, tl.sort(key), -9223372036854775807), 0)
    return (key <= kth) & (K > 0)


@triton.jit
def _top_k_mask_count(vals, offs, K):
    # _top_k_mask's set by counting instead of a sort: each key's rank is the number of smaller keys ([n, n]
    # compares in registers)
    key = _order_keys(vals, offs)
    rank = tl.sum((key[None, :] < key[:, None]).to(tl.int32), 1)
    return (rank < K) & (K > 0)


@triton.jit
def _sizes_at(s_row, idx, mask, HAS_SIZES: tl.constexpr):
    # token sizes at rows idx of one sample's size row, in fp32 (1 without sizes); 0 where masked off
    if HAS_SIZES:
        return tl.load(s_row + idx, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, 1.0, 0.0)


@triton.jit
def _tokens_at(x_row, y_row, rows, offs_c, sxn, syn, m, HAS_Y: tl.constexpr):
    # token rows ``rows`` x columns ``offs_c`` of one sample, 0 where masked off; HAS_Y: the tokens are
    # x + y (a block's last residual add left to the caller), summed in fp32 and rounded to x's dtype
    # as the add would have stored them
    xt = tl.load(x_row + rows[:, None] * sxn + offs_c[None, :], mask=m, other=0.0)
    if HAS_Y:
        yt = tl.load(y_row + rows[:, None] * syn + offs_c[None, :], mask=m, other=0.0)
        xt = (xt.to(tl.float32) + yt.to(tl.float32)).to(xt.dtype)
    return xt


@triton.jit
def _copy_prefix(x_row0, y_row0, o_row0, sxn, syn, oxn, offs_p, pm, offs_c, cm, HAS_Y: tl.constexpr):
    # the prefix rows (never reduced) of one column tile, copied to the same rows of the output
    # (HAS_Y: the rows of x + y, see _tokens_at)
    m = pm[:, None] & cm[None, :]
    xp = _tokens_at(x_row0, y_row0, offs_p, offs_c, sxn, syn, m, HAS_Y)
    tl.store(o_row0 + offs_p[:, None] * oxn + offs_c[None, :], xp, mask=m)


@triton.jit
def _compose_source(src_row, map_row, out_row, N0, BS: tl.constexpr):
    # out[s] = map[src[s]] (-1 stays -1): the source map after one reduction step, whose old -> new
    # row map was written to map_row by this program (a CTA barrier must separate the two)
    for s0 in range(0, N0, BS):
        offs_s = s0 + tl.arange(0, BS)
        sm_ = offs_s < N0
        old = tl.load(src_row + offs_s, mask=sm_, other=-1)
        new = tl.load(map_row + tl.maximum(old, 0), mask=sm_ & (old >= 0), other=-1)
        tl.store(out_row + offs_s, tl.where(old >= 0, new, -1).to(tl.int64), mask=sm_)


@functools.lru_cache(maxsize=1024)
def _column_groups(c: int, bc: int, bsz: int, programs_per_sm: int, device) -> int:
    """Programs per sample for kernels that split a sample's ``c`` columns (tiles of ``bc``): enough
    for about ``programs_per_sm`` programs per SM, each with an even share of the tiles. Cached: the
    arithmetic and the device lookup cost about 2 us of host time per call, the cache 0.3."""
    tiles = _cdiv(c, bc)
    groups = min(tiles, max(1, _cdiv(programs_per_sm * _num_sms(device), bsz)))
    return _cdiv(tiles, _cdiv(tiles, groups))


def _vec(dtype, *ints) -> int:
    """Elements per 16-byte vector for a kernel that takes these sizes and strides divided by it (its ``VEC``) and
    multiplies them back: Triton proves a load 16-byte aligned only from values divisible by 16, so a head dim or
    stride of 72 (SigLIP) loaded 2 bytes at a time (sm_90 build of ``_bm_best``: 128 ``LDG.E.U16`` per tile against
    16 ``LDG.E.128``). 1 (the values as they are) where all are multiples of 16, or one is not of the vector."""
    v = 16 // dtype.itemsize
    return 1 if all(i % 16 == 0 for i in ints) or any(i % v for i in ints) else v


def _in_vectors(dtype, *ints) -> tuple[int, list[int]]:
    """``(VEC, the ints divided by it)``: what a kernel with a ``VEC`` parameter takes (see :func:`_vec`)."""
    v = _vec(dtype, *ints)
    return v, [i // v for i in ints]


def _exact_lowp(dtype, max_size) -> bool:
    """Whether integer token sizes up to ``max_size`` are exact in ``dtype`` (fp16: 2048, bf16: 256), so
    size-weighted sums may take tensor-core products in the token dtype."""
    return (dtype == torch.float16 and max_size <= 2048) or (dtype == torch.bfloat16 and max_size <= 256)


def _key_bias(bias, b: int, n: int, dummy):
    """The ``[B, 1, 1, N]`` key bias as ``(tensor, batch stride, token stride)`` for a kernel, broadcast over
    the batch if given for one sample; without a bias ``dummy`` (any tensor, never read) and zero strides.
    The bias itself goes to the kernel with its own strides (a reshape and an expand cost about 3 us of host
    time); another layout takes that way."""
    if bias is None:
        return dummy, 0, 0
    shape = bias.shape
    if len(shape) == 4 and shape[1] == shape[2] == 1 and shape[0] in (1, b) and shape[3] in (1, n):
        st = bias.stride()
        return bias, (st[0] if shape[0] != 1 else 0), (st[3] if shape[3] != 1 else 0)
    bias2 = bias.reshape(bias.shape[0], bias.shape[-1]).expand(b, n)
    return (bias2, *bias2.stride())


def _rows_contiguous(t):
    """``(t, t.stride())`` with ``t``'s last dim contiguous (a copy if it is not): the strides read once, as one
    tuple (each ``t.stride(i)`` call costs about 0.3 us of host time)."""
    st = t.stride()
    if st[-1] != 1:
        t = t.contiguous()
        st = t.stride()
    return t, st


def _sig(t):
    """What a launch plan's key holds of a tensor argument (or None): shape, strides, dtype."""
    return None if t is None else (t.shape, t.stride(), t.dtype)


def _last_contiguous(t):
    """``t`` (or None) with its last dim contiguous (a copy if it is not)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _head_strides(name: str, *tensors) -> list:
    """The strides of each tensor (one tuple each), which must have a contiguous last (head) dim."""
    out = []
    for t in tensors:
        st = t.stride()
        if st[-1] != 1:
            raise ValueError(f"{name} kernel: the head dim must be contiguous")
        out.append(st)
    return out


@triton.jit
def _argmax_update(vals, cols, best, arg):
    # running argmax over column tiles: the max of each row of ``vals`` [rows, cols] and its first column
    # (ties: the lowest index, as torch.max / argmax), kept where it beats ``best`` strictly (an earlier
    # tile keeps a tie)
    tmax = tl.max(vals, 1)
    targ = tl.min(tl.where(vals == tmax[:, None], cols[None, :], 2147483647), 1)
    better = tmax > best
    return tl.where(better, tmax, best), tl.where(better, targ, arg)


# -- ToMe's matching (merge.py): metric rows, unit rows, cosine tiles, rows read through an order -----------------
@triton.jit
def _unit_rows(t):
    # rows scaled to unit norm in t's own dtype, like the references (norm rounded, then the division)
    tf = t.to(tl.float32)
    nrm = tl.sqrt(tl.sum(tf * tf, 1)).to(t.dtype).to(tl.float32)
    return (tf / tl.maximum(nrm, 1e-6)[:, None]).to(t.dtype)


@triton.jit
def _metric_rows(m_row, rows, offs_d, mask, smn, smh, H: tl.constexpr, UNROLL: tl.constexpr = True):
    # the metric's rows ``rows`` of one sample (columns offs_d; 0 where masked off). H > 1: the keys of H heads
    # (stride smh) averaged as the reference's ``k.mean(1)``: float32 sums (in the order of a CPU's mean of contiguous
    # keys: 16 heads at a time in order, then those partial sums; other orders differ by an ulp of float32), divided by
    # H (IEEE division) and rounded to the keys' dtype
    # UNROLL (batch 1): the head loop unrolls, so the H loads are in flight together (a loop waits for each head's
    # load in turn: a serial chain of H load latencies per tile). Large batches hide that latency with other
    # programs, and the unrolled loads spill under merge_step's register cap: there the loop stays a loop
    ptrs = m_row + rows[:, None] * smn + offs_d[None, :]
    tot = tl.zeros(ptrs.shape, tl.float32)
    if UNROLL:
        for h0 in tl.static_range(0, H, 16):
            part = tl.load(ptrs + h0 * smh, mask=mask, other=0.0).to(tl.float32)
            for h in tl.static_range(1, 16):
                if h0 + h < H:
                    part += tl.load(ptrs + (h0 + h) * smh, mask=mask, other=0.0).to(tl.float32)
            tot += part
    else:
        for h0 in range(0, H, 16):
            part = tl.load(ptrs + h0 * smh, mask=mask, other=0.0).to(tl.float32)
            for h in range(h0 + 1, tl.minimum(h0 + 16, H)):
                part += tl.load(ptrs + h * smh, mask=mask, other=0.0).to(tl.float32)
            tot += part
    if H == 1:  # the mean of one head is the row itself (a division by 1 is exact): no IEEE division per element
        return tot.to(m_row.dtype.element_ty)
    h = tot * 0.0 + H
    if _INTERPRETED or H > 64:
        # the IEEE division; a zero dividend takes its slow path, so the masked-off lanes (a head dim off a power of
        # two) divide H instead and are 0 again after (the same bits)
        q = tl.math.div_rn(tl.where(mask, tot, h), h)
    else:
        # tot / H correctly rounded without the division's instruction sequence (session 16): q0 = RN(tot RN(1/H)),
        # the remainder tot - q0 H is exact in one FMA, and one more FMA corrects q0. Checked against the IEEE
        # quotient for H = 2..64 on every float32 significand (kernels/NOTES.md); 1 / H is folded in double, whose
        # float32 rounding is RN(1/H) for those H. The interpreter's fma rounds twice, so it keeps the division.
        # A zero sum stays itself (the sign of -0.0, as the division keeps it)
        rh = 1.0 / H
        q0 = tot * rh
        q = tl.where(tot == 0.0, tot, tl.math.fma(tl.math.fma(-q0, h, tot), rh, q0))
    return tl.where(mask, q, 0.0).to(m_row.dtype.element_ty)


@triton.jit
def _cosine_tile(an, bt, IS_F32: tl.constexpr):
    # cosine similarities [A rows, B rows] of the unit rows ``an`` with the rows ``bt`` (normalised here), in
    # float32 rounded to the metric's dtype like the reference's matmul (float32: IEEE products, no tf32, so
    # the same partners as the float32 reference)
    bn_ = _unit_rows(bt)
    if IS_F32:
        sim = tl.dot(an, tl.trans(bn_), input_precision="ieee")
    else:
        sim = tl.dot(an, tl.trans(bn_)).to(bt.dtype).to(tl.float32)
    return sim


@triton.jit
def _at(prm, v, mask, PERM: tl.constexpr):
    # the stored row of place v: prm[v] when the step runs on the rows in the order ``perm`` (pitome), else v
    if PERM:
        return tl.load(prm + v, mask=mask, other=0).to(tl.int32)
    return v
