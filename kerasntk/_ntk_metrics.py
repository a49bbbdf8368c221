"""Kernel metrics (docs/methods.md §5), re-exported by `kerasntk.ntk`; every reduction runs in float64.

Each accepts a trace kernel (N, N) or a full kernel (N, N, O, O); a full kernel is viewed as the
(N·O, N·O) matrix with row index i·O + a.
"""

import numpy as np


def _matrix(K, name="K"):
    """A kernel as a square float64 matrix: (N, N) as is, (N, N, O, O) as (N·O, N·O)."""
    K = np.asarray(K, dtype=np.float64)
    if K.ndim == 2 and K.shape[0] == K.shape[1]:
        return K
    if K.ndim == 4 and K.shape[0] == K.shape[1] and K.shape[2] == K.shape[3]:
        n, _, o, _ = K.shape
        return K.transpose(0, 2, 1, 3).reshape(n * o, n * o)
    raise ValueError(f"{name} must be a trace kernel (N, N) or a full kernel (N, N, O, O), got shape {K.shape}")


def _inner(a, b):
    return float(np.dot(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)))


def kernel_distance(K1, K2):
    """S(K1, K2) = 1 − ⟨K1, K2⟩_F / (‖K1‖_F ‖K2‖_F): 0 for proportional kernels, 2 for opposite ones."""
    K1, K2 = np.asarray(K1), np.asarray(K2)
    if K1.shape != K2.shape:
        raise ValueError(f"kernels must have the same shape, got {K1.shape} and {K2.shape}")
    norms = np.sqrt(_inner(K1, K1) * _inner(K2, K2))
    if norms == 0:
        raise ValueError("kernel_distance is undefined for an all-zero kernel")
    return 1.0 - _inner(K1, K2) / norms


def _check_times(times, count):
    """Times as a strictly increasing float64 array with one entry per kernel."""
    times = np.asarray(times, dtype=np.float64)
    if times.shape != (count,):
        raise ValueError(f"times must have one entry per kernel ({count}), got shape {times.shape}")
    if np.any(np.diff(times) <= 0):
        raise ValueError(f"times must be strictly increasing, got {times.tolist()}")
    return times


def kernel_velocity(kernels, times, dt=None):
    """v_i = S(K_i, K_j) / (t_j − t_i) with t_j = t_i + dt (docs/methods.md §5: a fixed dt, the paper's 0.4 epoch), NaN
    where no kernel is at t_i + dt; `dt=None` takes the next kernel (NaN at the last time)."""
    times = _check_times(times, len(kernels))
    return velocity_from(lambda i, j: kernel_distance(kernels[i], kernels[j]), times, dt)


def velocity_from(distance, times, dt):
    """Forward-difference velocity over a fixed `dt` (or to the next time) from `distance(i, j)`."""
    v = np.full(len(times), np.nan)
    for i, t in enumerate(times):
        later = np.flatnonzero(np.isclose(times, t + dt, rtol=0, atol=1e-9)) if dt is not None else [i + 1]
        if len(later) and later[0] < len(times):
            j = later[0]
            v[i] = distance(i, j) / (times[j] - t)
    return v


def _targets(y, n, o):
    """Targets as an (M, C) float64 matrix matching the kernel matrix rows: one-hot Y, or vec(Y) for full."""
    y = np.asarray(y)
    if y.ndim == 1:
        if not np.issubdtype(y.dtype, np.integer) or y.min(initial=0) < 0:
            raise ValueError("integer class labels y must be non-negative integers")
        y = np.eye(max(int(y.max()) + 1, o or 0))[y]
    if y.ndim != 2 or y.shape[0] != n:
        raise ValueError(f"y must be labels (N,) or one-hot (N, C) with N = {n}, got shape {y.shape}")
    if o is None:
        return y.astype(np.float64)
    if y.shape[1] != o:
        raise ValueError(f"one-hot y has {y.shape[1]} classes but the full kernel has {o} logits")
    return y.astype(np.float64).reshape(n * o, 1)


def _center(K):
    """H K H with H = I − 11ᵀ/M."""
    return K - K.mean(axis=0, keepdims=True) - K.mean(axis=1, keepdims=True) + K.mean()


def kernel_alignment(K, y, centered=True):
    """Kernel–target alignment ⟨K, YYᵀ⟩_F / (‖K‖_F ‖YYᵀ‖_F) (Cortes et al. 2012 when centered).

    y: integer labels (N,) or one-hot (N, C). For a full kernel the target is vec(Y)vec(Y)ᵀ over the
    (N·O) index; centering applies H = I − 11ᵀ/M to both matrices over their M rows.
    """
    K = np.asarray(K)
    M = _matrix(K)
    Y = _targets(y, K.shape[0], K.shape[2] if K.ndim == 4 else None)
    if centered:
        M, Y = _center(M), Y - Y.mean(axis=0, keepdims=True)
    target = Y @ Y.T
    norms = np.linalg.norm(M) * np.linalg.norm(target)
    if norms == 0:
        raise ValueError("kernel_alignment is undefined when the (centred) kernel or target is zero")
    return float(np.sum(M * target) / norms)


def _spectrum(K):
    """Eigenvalues of the symmetrised kernel matrix, descending, in float64."""
    M = _matrix(K)
    return np.linalg.eigvalsh((M + M.T) / 2)[::-1]


def eigenvalues(K, k):
    """The k largest eigenvalues of the kernel matrix, descending (O(M³) for an M×M matrix)."""
    size = _matrix(K).shape[0]
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= size:
        raise ValueError(f"k must be an integer in [1, {size}], got {k!r}")
    return _spectrum(K)[:k]


def effective_rank(K):
    """Entropy effective rank exp(−Σ p log p), p = λ / Σλ over non-negative eigenvalues (Roy & Vetterli 2007)."""
    lam = np.clip(_spectrum(K), 0, None)
    if lam.sum() == 0:
        raise ValueError("effective_rank is undefined for a kernel with no positive eigenvalue")
    p = lam[lam > 0] / lam.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def distance_matrix(kernels):
    """S(K_s, K_t) for every pair of kernels, (T, T), from their float64 Gram matrix (one pass per pair)."""
    T = len(kernels)
    gram = np.zeros((T, T))
    for s in range(T):
        for t in range(s, T):
            gram[s, t] = gram[t, s] = _inner(kernels[s], kernels[t])
    norms = np.sqrt(np.diag(gram))
    if np.any(norms == 0):
        raise ValueError("kernel distances are undefined for an all-zero kernel")
    S = 1.0 - gram / np.outer(norms, norms)
    np.fill_diagonal(S, 0.0)
    return S


class KernelTrajectory:
    """A kernel trajectory built one kernel at a time, and its metric set: the one implementation behind the
    experiment's `parent(time, metric)` and `NTKMonitor`, so both write the same metrics.

    y: probe labels for the alignments (None: no alignment metrics). dt: the velocity's fixed time step
    (None: to the next kernel). Velocity is one forward difference everywhere, v(t) = S(K_t, K_{t+dt}) / dt,
    NaN while no kernel at t + dt has been added.
    """

    def __init__(self, y=None, dt=None):
        self.y, self.dt = (None if y is None else np.asarray(y)), (None if dt is None else float(dt))
        if self.dt is not None and not self.dt > 0:
            raise ValueError(f"dt must be a time step > 0 or None (to the next kernel), got {dt!r}")
        self.kernels, self.times, self.learning_rates, self._per_kernel = [], [], [], []
        self._gram = np.zeros((0, 0))

    def __len__(self):
        return len(self.kernels)

    def add(self, time, kernel, learning_rate=float("nan")):
        """Append the kernel measured at `time` (after every earlier one) with the learning rate used then."""
        kernel = np.asarray(kernel)
        if self.kernels and kernel.shape != self.kernels[0].shape:
            raise ValueError(f"kernels must have one shape, got {kernel.shape} after {self.kernels[0].shape}")
        if self.times and not float(time) > self.times[-1]:
            raise ValueError(f"times must be strictly increasing, got {float(time)} after {self.times[-1]}")
        row = [_inner(k, kernel) for k in self.kernels] + [_inner(kernel, kernel)]
        if row[-1] == 0:
            raise ValueError("kernel distances are undefined for an all-zero kernel")
        gram = np.zeros((len(row), len(row)))
        gram[:-1, :-1], gram[-1], gram[:, -1] = self._gram, row, row
        self._gram = gram
        own = dict(kernel_top_eigenvalue=eigenvalues(kernel, 1)[0], kernel_effective_rank=effective_rank(kernel))
        if self.y is not None:
            own.update(kernel_alignment=kernel_alignment(kernel, self.y, centered=True),
                       kernel_alignment_uncentered=kernel_alignment(kernel, self.y, centered=False))
        self.kernels.append(kernel)
        self.times.append(float(time))
        self.learning_rates.append(float(learning_rate))
        self._per_kernel.append(own)

    def distance_matrix(self):
        """S(K_s, K_t) between every two kernels added, (T, T)."""
        norms = np.sqrt(np.diag(self._gram))
        S = 1.0 - self._gram / np.outer(norms, norms)
        np.fill_diagonal(S, 0.0)
        return S

    def metrics(self):
        """{name: (T,)}: kernel_distance_from_init, kernel_distance_to_final (to the latest kernel),
        kernel_velocity, kernel_velocity_per_lr (NaN where the learning rate is), kernel_top_eigenvalue,
        kernel_effective_rank and, with labels, kernel_alignment (centred) and kernel_alignment_uncentered."""
        if not self.kernels:
            raise ValueError("the kernel trajectory is empty: add a kernel first")
        S, times = self.distance_matrix(), np.array(self.times)
        velocity = velocity_from(lambda i, j: S[i, j], times, self.dt)
        with np.errstate(divide="ignore", invalid="ignore"):  # a schedule's lr 0 at the end: inf or NaN
            per_lr = velocity / np.array(self.learning_rates)
        metrics = dict(kernel_distance_from_init=S[0].copy(), kernel_distance_to_final=S[:, -1].copy(),
                       kernel_velocity=velocity, kernel_velocity_per_lr=per_lr)
        for name in self._per_kernel[0]:
            metrics[name] = np.array([own[name] for own in self._per_kernel], np.float64)
        return metrics


def trajectory_metrics(kernels, times, y, learning_rates=None, dt=None):
    """Metrics of a kernel trajectory K_0..K_{T-1} at `times`: (dict name -> array (T,), S (T, T)), those of
    `KernelTrajectory(y, dt)` with the kernels added in order (learning_rates None: kernel_velocity_per_lr NaN)."""
    times = _check_times(times, len(kernels))
    if learning_rates is None:
        learning_rates = np.full(len(kernels), np.nan)
    lrs = np.asarray(learning_rates, dtype=np.float64)
    if lrs.shape != times.shape:
        raise ValueError(f"learning_rates must have one entry per kernel ({len(kernels)}), got shape {lrs.shape}")
    trajectory = KernelTrajectory(y, dt)
    for t, K, lr in zip(times, kernels, lrs):
        trajectory.add(t, K, lr)
    return trajectory.metrics(), trajectory.distance_matrix()


def layer_trajectory_metrics(kernels, times, y=None, dt=None):
    """Per-layer metrics of a per-layer kernel trajectory, kernels (T, L, N, N[, O, O]) at `times`: a dict
    name -> array (T, L) of kernel_distance_from_init, kernel_velocity (as `kernel_velocity(..., dt)`) and,
    with labels y, kernel_alignment (centred). Layer l's values are those of its kernel Θ_l alone."""
    kernels = [np.asarray(K) for K in kernels]
    if not kernels or kernels[0].ndim not in (3, 5) or any(K.shape != kernels[0].shape for K in kernels):
        raise ValueError("kernels must be per-layer kernels (L, N, N) or (L, N, N, O, O) of one shape, got shapes "
                         f"{[K.shape for K in kernels]}")
    times = _check_times(times, len(kernels))
    metrics = {"kernel_distance_from_init": [], "kernel_velocity": []}
    if y is not None:
        metrics["kernel_alignment"] = []
    for layer in range(kernels[0].shape[0]):
        S = distance_matrix([K[layer] for K in kernels])
        metrics["kernel_distance_from_init"].append(S[0])
        metrics["kernel_velocity"].append(velocity_from(lambda i, j: S[i, j], times, dt))
        if y is not None:
            metrics["kernel_alignment"].append([kernel_alignment(K[layer], y, centered=True) for K in kernels])
    return {name: np.array(values, np.float64).T for name, values in metrics.items()}
