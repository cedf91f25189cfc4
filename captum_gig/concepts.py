"""Concept vectors of a layer (paper section 3.2.1, appendix B).

:class:`BisectingSphericalKMeans` is the clustering estimator (scikit-learn
shape); :class:`ConceptBasis` is what the rest of the library consumes: the
concept vectors ``V (K, C)`` and the offset ``beta (C,)`` of one layer, however
they were found.
"""

import heapq
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed as _dist
from ._io import as_json_value, load_artifact, save_artifact

__all__ = ["BisectingSphericalKMeans", "ConceptBasis", "batchnorm_offset", "resolve_offset", "register_extractor"]

OffsetSpec = Union[None, str, Tensor, nn.Module]


def batchnorm_offset(bn: nn.Module) -> Tensor:
    r"""Net shift of a BatchNorm layer in eval mode (appendix B, eq. 8).

    .. math:: \mu_{BN} = \beta_{BN} - \gamma_{BN}\,\mu_{rn} / \sqrt{\sigma^2_{rn} + \epsilon}

    which is the BatchNorm output for an all-zero input.
    """
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"offset module must be a BatchNorm layer, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("offset BatchNorm has no running statistics (track_running_stats=False)")
    mean, var = bn.running_mean.detach(), bn.running_var.detach()
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(mean)
    return beta - gamma * mean / torch.sqrt(var + bn.eps)


def resolve_offset(offset: OffsetSpec, X: Tensor) -> Tensor:
    """The ``(C,)`` offset for PFVs ``X (N, C)`` from a user's ``offset`` argument."""
    c = X.shape[1]
    if offset is None or (isinstance(offset, str) and offset == "zero"):
        beta = torch.zeros(c, dtype=X.dtype, device=X.device)
    elif isinstance(offset, str) and offset == "mean":
        beta = X.mean(0)
    elif isinstance(offset, str):
        raise ValueError(f"offset must be None, 'zero', 'mean', a (C,) tensor or a BatchNorm module; got {offset!r}")
    elif isinstance(offset, nn.Module):
        beta = batchnorm_offset(offset)
    elif isinstance(offset, Tensor):
        beta = offset.detach()
    else:
        raise TypeError(
            f"offset must be None, 'zero', 'mean', a (C,) tensor or a BatchNorm module; got {type(offset).__name__}"
        )
    if beta.shape != (c,):
        raise ValueError(f"offset must have shape ({c},) to match the PFVs' {c} channels; got {tuple(beta.shape)}")
    if not torch.isfinite(beta).all():
        raise ValueError("offset contains NaN or inf")
    return beta.to(device=X.device, dtype=X.dtype)


def _check_pfvs(X, argument: str = "X") -> Tensor:
    from .pfv import PFVSet

    if isinstance(X, PFVSet):
        X = X.vectors
    if not isinstance(X, Tensor):
        raise TypeError(f"{argument} must be a (N, C) tensor or a PFVSet; got {type(X).__name__}")
    if X.dim() != 2:
        raise ValueError(f"{argument} must be (N, C) PFVs; got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        raise TypeError(f"{argument} must be a floating point tensor; got {X.dtype}")
    if not torch.isfinite(X).all():
        raise ValueError(f"{argument} contains NaN or inf")
    return X


#: clusters of at most this many rows are split many at a time, in the row space (see
#: ``BisectingSphericalKMeans._split_small``); larger ones one by one in the channel space
SMALL_SPLIT_ROWS = 64

# power iteration stops once the direction turns by less than this (1 - |cos|): it only seeds
# the 2-means, which refines the split
_POWER_TOL = 1e-3


class BisectingSphericalKMeans:
    r"""Bisecting spherical k-means (Steinbach et al. 2000; Dhillon & Modha 2001).

    Rows are L2-normalised; starting from one cluster, the largest cluster
    (ties: the lowest index) is split in two with spherical 2-means (cosine
    similarity, centroids are normalised sums) until ``n_clusters`` exist.

    Each 2-means starts from the split along the cluster's principal direction
    (found by power iteration), so the result does not depend on the order of
    the rows, and every step is a sum over rows (which is what lets a
    distributed fit reduce partial sums). Large clusters iterate in the channel
    space from a start vector drawn from ``seed``. Clusters of at most
    :data:`SMALL_SPLIT_ROWS` rows -- most of the splits when K is large --
    iterate on their centred Gram matrix instead, from the row farthest from
    their mean, and are split many at a time (a split depends only on the
    cluster's own rows, so the clusters the heap will ask for next are split
    together in one batch).

    Args:
        n_clusters (int): number of clusters K.
        max_iter (int, optional): 2-means iterations per split. Default: 50
        power_iter (int, optional): power iterations for the initial split.
                    Default: 20
        seed (int, optional): seed of the power-iteration start vectors. Default: 0
        progress (bool, optional): progress bar over splits. Default: False

    Attributes:
        labels_ (Tensor): ``(N,)`` cluster of each row.
        cluster_centers_ (Tensor): ``(K, C)`` unit centroids (normalised sums).
        counts_ (Tensor): ``(K,)`` cluster sizes.
        split_history_ (list of (int, int)): ``(cluster index, its size)`` of
                    every split in order; cluster ``j`` splits into ``j`` and
                    the next free index.

    Examples::

        >>> km = BisectingSphericalKMeans(64, seed=0).fit(X)
        >>> km.labels_.shape, km.cluster_centers_.shape
        (torch.Size([N]), torch.Size([64, C]))
    """

    def __init__(self, n_clusters: int, *, max_iter: int = 50, power_iter: int = 20, seed: int = 0, progress: bool = False):
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.power_iter = power_iter
        self.seed = seed
        self.progress = progress

    # Sums over rows go through this: an all_reduce in a distributed fit, the identity otherwise.
    @staticmethod
    def _reduce(t: Tensor) -> Tensor:
        return _dist.all_reduce(t)

    def fit(self, X: Tensor, y=None) -> "BisectingSphericalKMeans":
        X = _check_pfvs(X)
        n = X.shape[0]
        k = self.n_clusters
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"n_clusters must be a positive int; got {k!r}")
        if k > n:
            raise ValueError(f"n_clusters={k} exceeds the number of PFVs ({n})")
        Y = torch.nn.functional.normalize(X, dim=1)
        # distributed: this process works on rows rank, rank + W, ... (every sum goes through _reduce)
        rows = _dist.shard_indices(n).to(X.device) if _dist.is_distributed() else torch.arange(n, device=X.device)
        if _dist.is_distributed():
            Y = Y[rows]
        local = not _dist.is_distributed()
        members: List[Tensor] = [torch.arange(Y.shape[0], device=X.device)]
        heap: List[Tuple[int, int]] = [(-n, 0)]
        history: List[Tuple[int, int]] = []
        with tqdm(total=k - 1, disable=not self.progress or not _dist.is_main_process(), desc="bisecting k-means", unit="split") as bar:
            self._loop(Y, rows, members, heap, history, k, local, bar)
        labels = torch.empty(Y.shape[0], dtype=torch.long, device=X.device)
        for j, idx in enumerate(members):
            labels[idx] = j
        if _dist.is_distributed():  # every process gets all labels, in row order
            full = torch.empty(n, dtype=torch.long, device=X.device)
            full[torch.cat(_dist.all_gather(rows))] = torch.cat(_dist.all_gather(labels))
            labels, Y = full, torch.nn.functional.normalize(X, dim=1)
        centers = torch.zeros(k, X.shape[1], dtype=X.dtype, device=X.device).index_add_(0, labels, Y)
        self.labels_ = labels
        self.cluster_centers_ = torch.nn.functional.normalize(centers, dim=1)
        self.counts_ = torch.bincount(labels, minlength=k)
        self.split_history_ = history
        return self

    def _loop(self, Y, rows, members, heap, history, k, local, bar) -> None:
        ready: Dict[int, Tuple[Tensor, Tuple[int, int]]] = {}  # small clusters split ahead of their turn
        while len(members) < k:
            neg_size, j = heapq.heappop(heap)
            idx = members[j]
            history.append((j, -neg_size))
            if -neg_size <= SMALL_SPLIT_ROWS:
                if j not in ready:
                    # the clusters that may be split next: the largest ones, as many as splits remain
                    # (a split's children can overtake some of them; those splits are wasted, not wrong)
                    later = heapq.nsmallest(k - len(members) - 1, heap)
                    batch = [j] + [c for s, c in later if s <= -2 and c not in ready]
                    ready.update(zip(batch, _dist.split_small_clusters(self, Y, rows, [members[c] for c in batch])))
                right, sizes = ready.pop(j)
                members[j], new = idx[~right], idx[right]
            elif local:  # single process: no wrappers, sizes are the local row counts
                right = self._split_local(Y[idx], len(history) - 1)
                members[j], new = idx[~right], idx[right]
                sizes = (members[j].shape[0], new.shape[0])
            else:
                right = _dist.split_cluster(self, Y[idx], rows[idx], -neg_size, len(history) - 1)
                members[j], new = idx[~right], idx[right]
                sizes = self._reduce(torch.tensor([members[j].shape[0], new.shape[0]], dtype=torch.float64, device=Y.device))
            members.append(new)
            heapq.heappush(heap, (-int(sizes[0]), j))
            heapq.heappush(heap, (-int(sizes[1]), len(members) - 1))
            bar.update(1)

    def _start_vector(self, c: int, split_number: int, like: Tensor) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + split_number)
        return torch.randn(c, generator=g, dtype=torch.float64).to(device=like.device, dtype=like.dtype)

    def _split(self, Y: Tensor, split_number: int, row_ids: Optional[Tensor] = None) -> Tensor:
        """Boolean mask of the rows of ``Y`` (unit rows) that form the new cluster."""
        if not _dist.is_distributed():
            return self._split_local(Y, split_number)
        red = self._reduce
        n = red(torch.tensor(float(Y.shape[0]), dtype=Y.dtype, device=Y.device))
        total = red(Y.sum(0))
        mean = total / n
        # principal direction of the centred rows
        v = self._start_vector(Y.shape[1], split_number, Y)
        v = v / v.norm()
        for _ in range(self.power_iter):
            w = red(Y.t() @ (Y @ v)) - n * mean * (mean @ v)
            norm = w.norm()
            if norm == 0:
                break
            w = w / norm
            done = (w @ v).abs() > 1 - _POWER_TOL
            v = w
            if done:
                break
        right = (Y @ v - mean @ v) > 0
        if not _both_sides(right, red):
            right = _alternate(Y.shape[0], row_ids, Y.device)
        # spherical 2-means
        s1 = red(Y.t() @ right.to(Y.dtype))
        for _ in range(self.max_iter):
            centroids = torch.nn.functional.normalize(torch.stack([total - s1, s1]), dim=1)
            new_right = Y @ (centroids[1] - centroids[0]) > 0
            joined, left = new_right & ~right, right & ~new_right
            changed = red((joined | left).sum().to(Y.dtype))
            if not _both_sides(new_right, red) or changed == 0:
                break
            s1 = s1 + red(Y[joined].sum(0) - Y[left].sum(0))
            right = new_right
        return right


    def _split_local(self, Y: Tensor, split_number: int) -> Tensor:
        """:meth:`_split` in a single process: the same arithmetic in the same order, so the
        same mask, without the reduction wrappers and with one host sync per test."""
        m = Y.shape[0]
        n = torch.tensor(float(m), dtype=Y.dtype, device=Y.device)
        total = Y.sum(0)
        mean = total / n
        Yt = Y.t()
        # the threshold as the comparison in Y's dtype sees it
        near_one = torch.tensor(1 - _POWER_TOL, dtype=Y.dtype).item()
        n_mean = n * mean  # (n * mean) * (mean @ v), evaluated left to right as in _split
        v = self._start_vector(Y.shape[1], split_number, Y)
        v = v / v.norm()
        for _ in range(self.power_iter):
            w = Yt @ (Y @ v) - n_mean * (mean @ v)
            norm = w.norm()
            if norm.item() == 0:
                break
            w = w / norm
            done = abs((w @ v).item()) > near_one
            v = w
            if done:
                break
        right = (Y @ v - mean @ v) > 0
        k = int(right.sum())
        if k == 0 or k == m:
            right = torch.arange(m, device=Y.device) % 2 == 1
        s1 = Yt @ right.to(Y.dtype)
        for _ in range(self.max_iter):
            centroids = torch.nn.functional.normalize(torch.stack([total - s1, s1]), dim=1)
            new_right = Y @ (centroids[1] - centroids[0]) > 0
            k = int(new_right.sum())
            if k == 0 or k == m:
                break
            joined, left = new_right & ~right, right & ~new_right
            if not bool((joined | left).any()):
                break
            s1 = s1 + (Y[joined].sum(0) - Y[left].sum(0))  # only the rows that moved: one pass per iteration
            right = new_right
        return right

    def _split_small(self, Y: Tensor, clusters: List[Tensor]) -> List[Tensor]:
        """Split many small clusters at once: for each index tensor into ``Y``, the mask of the rows that move.

        The split rule of :meth:`_split_local`, batched over the clusters that
        pad to the same power of two (zero rows). The principal direction of a
        few centred rows lies in their span, so the power iteration runs on the
        small centred Gram matrix, starting from the column of the row farthest
        from the mean (not a random vector); a cluster is frozen once it
        converges, so its result depends only on its own rows.
        """
        out: List[Optional[Tensor]] = [None] * len(clusters)
        widths: Dict[int, List[int]] = {}
        for i, idx in enumerate(clusters):
            widths.setdefault(max(8, 1 << (idx.shape[0] - 1).bit_length()), []).append(i)
        near_one = torch.tensor(1 - _POWER_TOL, dtype=Y.dtype).item()
        for width, ids in widths.items():
            lengths = torch.tensor([clusters[i].shape[0] for i in ids], device=Y.device)
            b = len(ids)
            owner = torch.repeat_interleave(torch.arange(b, device=Y.device), lengths)
            slot = torch.arange(owner.shape[0], device=Y.device) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
            index = torch.zeros((b, width), dtype=torch.long, device=Y.device)
            real = torch.zeros((b, width), dtype=torch.bool, device=Y.device)
            index[owner, slot] = torch.cat([clusters[i].to(Y.device) for i in ids])
            real[owner, slot] = True
            Z = Y.index_select(0, index.view(-1)).view(b, width, -1).masked_fill_(~real.unsqueeze(2), 0)  # zero rows pad
            n = lengths.to(Y.dtype).view(b, 1, 1)
            total = Z.sum(1)
            mean = total.unsqueeze(2) / n  # (b, C, 1)
            cosine = torch.where(real, (Z @ mean).squeeze(2), torch.full_like(real, float("inf"), dtype=Y.dtype))
            far = cosine.argmin(1)  # the row farthest from the mean
            # power iteration on the centred (width x width) Gram matrix, from its column `far`
            G = Z @ Z.transpose(1, 2)
            r = G.sum(2, keepdim=True)
            pairs = real.unsqueeze(2) & real.unsqueeze(1)
            G = (G - r / n - r.transpose(1, 2) / n + r.sum(1, keepdim=True) / (n * n)) * pairs
            v = G.gather(2, far.view(b, 1, 1).expand(b, width, 1))
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
            active = torch.ones(b, dtype=torch.bool, device=Y.device)
            for _ in range(self.power_iter):
                w = G @ v
                norm = w.norm(dim=1, keepdim=True)
                moving = active.view(b, 1, 1) & (norm > 0)
                w = w / norm.clamp_min(1e-30)
                converged = ((w * v).sum(1).abs() > near_one).view(b)
                v = torch.where(moving, w, v)
                active = active & moving.view(b) & ~converged
                if not bool(active.any()):
                    break
            right = ((G @ v).squeeze(2) > 0) & real  # G v: the centred rows' projections on the direction
            k = right.sum(1)
            alternate = (torch.arange(width, device=Y.device) % 2 == 1) & real
            right = torch.where(((k == 0) | (k == lengths)).unsqueeze(1), alternate, right)
            s1 = (right.to(Y.dtype).unsqueeze(1) @ Z).squeeze(1)
            active = torch.ones(b, dtype=torch.bool, device=Y.device)
            for _ in range(self.max_iter):
                centroids = torch.nn.functional.normalize(torch.stack([total - s1, s1]), dim=2)
                new_right = ((Z @ (centroids[1] - centroids[0]).unsqueeze(2)).squeeze(2) > 0) & real
                k = new_right.sum(1)
                moved = active & (k > 0) & (k < lengths) & (new_right != right).any(1)
                if not bool(moved.any()):
                    break
                delta = (new_right.to(Y.dtype) - right.to(Y.dtype)) * moved.unsqueeze(1)
                s1 = s1 + (delta.unsqueeze(1) @ Z).squeeze(1)
                right = torch.where(moved.unsqueeze(1), new_right, right)
                active = moved
            for row, i in enumerate(ids):
                out[i] = right[row, : clusters[i].shape[0]]
        return out  # type: ignore[return-value]


def _alternate(n_local: int, row_ids: Optional[Tensor], device) -> Tensor:
    """Every other row of a cluster (by its position among the cluster's rows in the whole data)."""
    if row_ids is None or not _dist.is_distributed():
        return torch.arange(n_local, device=device) % 2 == 1
    everyone = torch.sort(torch.cat(_dist.all_gather(row_ids))).values
    return torch.searchsorted(everyone, row_ids) % 2 == 1


def _both_sides(mask: Tensor, red) -> bool:
    counts = red(torch.stack([mask.sum(), (~mask).sum()]).to(torch.float64))
    return bool((counts > 0).all())


def _fit_bisecting(Xc: Tensor, n_concepts: int, seed: int, progress: bool, **kwargs) -> Dict[str, Tensor]:
    km = BisectingSphericalKMeans(n_concepts, seed=seed, progress=progress, **kwargs).fit(Xc)
    return {"labels": km.labels_}


# name -> fit(centred PFVs, n_concepts, seed, progress, **kw) returning {"vectors"?, "labels"?}
_EXTRACTORS: Dict[str, Callable[..., Dict[str, Tensor]]] = {"bisecting": _fit_bisecting}


def register_extractor(name: str, fit: Callable[..., Dict[str, Tensor]]) -> None:
    """Make ``ConceptBasis.fit(..., method=name)`` use ``fit``.

    ``fit(Xc, n_concepts, seed, progress, **kwargs)`` receives the centred PFVs
    and returns a dict with ``"vectors" (K, C)`` and/or ``"labels" (N,)``; with
    labels only, concept vectors are the cluster means.
    """
    _EXTRACTORS[name] = fit


class ConceptBasis:
    r"""Concept vectors ``V (K, C)`` and offset ``beta (C,)`` of one layer.

    A PFV ``x`` is modelled as ``x ~ beta + u V`` with sparse coefficients
    ``u (K,)`` (paper eq. 1, 9). Use :meth:`fit` to find the concepts from PFVs,
    or wrap vectors that come from elsewhere.

    Args:
        vectors (Tensor): ``(K, C)`` concept vectors, one per row.
        offset (Tensor, optional): ``(C,)`` offset beta; zeros if None.
        labels (Tensor, optional): ``(N,)`` concept of each training PFV.
        sizes (Tensor, optional): ``(K,)`` training PFVs per concept.
        layer (str, optional): the layer the concepts belong to.
        method (str, optional): how the vectors were found.
        meta (dict, optional): further JSON-able information.

    Examples::

        >>> basis = ConceptBasis.fit(pfvs, n_concepts=8 * pfvs.n_channels, offset=model.layer3[5].bn3)
        >>> basis.vectors.shape
        torch.Size([8192, 1024])
    """

    def __init__(
        self,
        vectors: Tensor,
        offset: Optional[Tensor] = None,
        *,
        labels: Optional[Tensor] = None,
        sizes: Optional[Tensor] = None,
        layer: Optional[str] = None,
        method: str = "given",
        meta: Optional[Dict[str, Any]] = None,
    ):
        if not isinstance(vectors, Tensor) or vectors.dim() != 2:
            raise ValueError(
                f"vectors must be a (K, C) tensor; got {getattr(vectors, 'shape', type(vectors).__name__)}"
            )
        if not vectors.is_floating_point():
            raise TypeError(f"vectors must be floating point; got {vectors.dtype}")
        if not torch.isfinite(vectors).all():
            raise ValueError("concept vectors contain NaN or inf")
        if offset is None:
            offset = torch.zeros(vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
        if not isinstance(offset, Tensor) or offset.shape != (vectors.shape[1],):
            raise ValueError(
                f"offset must be a ({vectors.shape[1]},) tensor matching the vectors' channels; "
                f"got {getattr(offset, 'shape', type(offset).__name__)}"
            )
        if not torch.isfinite(offset).all():
            raise ValueError("offset contains NaN or inf")
        self.vectors = vectors.detach()
        self.offset = offset.detach().to(device=vectors.device, dtype=vectors.dtype)
        self.labels = labels
        self.sizes = sizes
        self.layer = layer
        self.method = method
        self.meta = dict(meta or {})

    @property
    def n_concepts(self) -> int:
        return self.vectors.shape[0]

    @property
    def n_channels(self) -> int:
        return self.vectors.shape[1]

    @property
    def normalized_vectors(self) -> Tensor:
        """``(K, C)`` unit-norm concept vectors (the paper's ``v-bar``)."""
        return torch.nn.functional.normalize(self.vectors, dim=1)

    def __repr__(self) -> str:
        layer = f", layer={self.layer!r}" if self.layer else ""
        return f"ConceptBasis(n_concepts={self.n_concepts}, n_channels={self.n_channels}, method={self.method!r}{layer})"

    @classmethod
    def fit(
        cls,
        X,
        n_concepts: int,
        *,
        method: str = "bisecting",
        offset: OffsetSpec = None,
        seed: int = 0,
        progress: bool = True,
        **kwargs,
    ) -> "ConceptBasis":
        r"""Find concept vectors of PFVs (appendix B).

        The offset is subtracted, the centred PFVs are clustered (bisecting
        spherical k-means by default) and each concept vector is the mean of
        its cluster's centred, unnormalised members.

        Args:
            X (Tensor or PFVSet): ``(N, C)`` PFVs.
            n_concepts (int): number of concepts K (the paper uses 8 x C).
            method (str, optional): the extractor; ``"bisecting"``, or another
                        registered with :func:`register_extractor`.
                        Default: ``"bisecting"``
            offset (optional): ``None``/``"zero"``, ``"mean"`` (data mean), a
                        ``(C,)`` tensor, or a BatchNorm module whose net shift
                        (eq. 8) is used. Default: None
            seed (int, optional): random seed; the fit is deterministic for it.
                        Default: 0
            progress (bool, optional): show progress. Default: True
            **kwargs: passed to the extractor (e.g. ``max_iter``).

        Returns:
            ConceptBasis: with ``vectors (K, C)``, ``offset (C,)``, and for
            clustering methods ``labels (N,)`` and ``sizes (K,)``.
        """
        from .pfv import PFVSet

        layer = X.layer if isinstance(X, PFVSet) else None
        X = _check_pfvs(X)
        if not isinstance(n_concepts, int) or n_concepts < 1:
            raise ValueError(f"n_concepts must be a positive int; got {n_concepts!r}")
        if n_concepts > X.shape[0]:
            raise ValueError(f"n_concepts={n_concepts} exceeds the number of PFVs ({X.shape[0]})")
        if method not in _EXTRACTORS:
            raise ValueError(f"method must be one of {sorted(_EXTRACTORS)}; got {method!r}")
        beta = resolve_offset(offset, X)
        Xc = X - beta
        result = _EXTRACTORS[method](Xc, n_concepts, seed=seed, progress=progress, **kwargs)
        labels = result.get("labels")
        sizes = None
        if labels is not None:
            sizes = torch.bincount(labels, minlength=n_concepts)
        vectors = result.get("vectors")
        if vectors is None:
            if labels is None:
                raise RuntimeError(f"extractor {method!r} returned neither vectors nor labels")
            sums = torch.zeros(n_concepts, X.shape[1], dtype=X.dtype, device=X.device).index_add_(0, labels, Xc)
            vectors = sums / sizes.clamp_min(1).unsqueeze(1).to(X.dtype)
        meta = {"seed": seed, "n_pfvs": X.shape[0], **{k: as_json_value(v) for k, v in kwargs.items()}}
        return cls(vectors, beta, labels=labels, sizes=sizes, layer=layer, method=method, meta=meta)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "ConceptBasis":
        """A copy with vectors and offset on ``device`` / in ``dtype``."""
        return ConceptBasis(
            self.vectors.to(device=device, dtype=dtype),
            self.offset.to(device=device, dtype=dtype),
            labels=self.labels.to(device) if self.labels is not None else None,
            sizes=self.sizes.to(device) if self.sizes is not None else None,
            layer=self.layer,
            method=self.method,
            meta=self.meta,
        )

    def save(self, path: str) -> None:
        """Save as safetensors with JSON metadata (no pickle)."""
        meta = {
            "layer": self.layer,
            "method": self.method,
            "n_concepts": self.n_concepts,
            "n_channels": self.n_channels,
            "info": self.meta,
        }
        tensors = {"vectors": self.vectors, "offset": self.offset, "labels": self.labels, "sizes": self.sizes}
        save_artifact(path, "ConceptBasis", tensors, meta)

    @classmethod
    def load(cls, path: str, device: str = "cpu") -> "ConceptBasis":
        """Load a basis written by :meth:`save`."""
        tensors, meta = load_artifact(path, "ConceptBasis", device)
        if "vectors" not in tensors or "offset" not in tensors:
            raise ValueError(f"{path!r} is missing the 'vectors' or 'offset' tensor")
        if tuple(tensors["vectors"].shape) != (meta.get("n_concepts"), meta.get("n_channels")):
            raise ValueError(f"{path!r}: tensor shapes do not match its metadata (tampered file?)")
        return cls(
            tensors["vectors"],
            tensors["offset"],
            labels=tensors.get("labels"),
            sizes=tensors.get("sizes"),
            layer=meta.get("layer"),
            method=meta.get("method", "given"),
            meta=meta.get("info", {}),
        )
