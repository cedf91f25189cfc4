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
from ._checks import all_finite
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
    if not all_finite(X):
        raise ValueError(f"{argument} contains NaN or inf")
    return X


#: clusters of at most this many rows are split many at a time (the ones the fit will ask for next,
#: together); larger ones one by one
BATCH_SPLIT_ROWS = 2048

#: clusters of at most this many rows (at most as many as channels, at least 64) are split in their row
#: space, from Gram matrices kept for the clusters split off them (see ``_GramStore``)
SMALL_SPLIT_ROWS = 256

# batched splits work on parts of at most this many elements per (b, w, C) or (b, w, w) tensor: small
# enough to stay in cache and to be allocated without page faults
_BATCH_ELEMENTS = 1 << 22

# the principal direction only seeds the 2-means, which refines the split: Lanczos stops once the top
# Ritz pair's residual is below this fraction of its Ritz value, the power method once the direction
# turns by less than this (1 - |cos|)
_LANCZOS_TOL, _POWER_TOL = 1e-2, 1e-3

# clusters of more than this many rows start their 2-means from the split of a sample of about
# _SAMPLE_ROWS of them (see BisectingSphericalKMeans._split_local)
_SAMPLE_ABOVE, _SAMPLE_ROWS = 8192, 4096


def _gram_split_rows(n_channels: int) -> int:
    # a Gram matrix of w rows costs w^2 per product against w C for the rows themselves: no dearer up to
    # w = C, and computed once for all the splits below
    return min(SMALL_SPLIT_ROWS, max(64, n_channels))


def _padded_width(size: int, gram: bool) -> int:
    """Width a cluster of ``size`` rows is padded to in a batch: a power of two for Gram matrices (many
    tiny clusters, few batches); for rows, a multiple of an eighth of the next power of two (at most a
    quarter more rows to stream)."""
    width = max(8, 1 << (size - 1).bit_length())
    if gram or width <= 64:
        return width
    quarter = width // 8
    return -(-size // quarter) * quarter


#: a cluster whose rows' mean cosine distance to their centroid is below this is one direction and is not
#: split (its halves would be two copies of one concept: on Fashion-MNIST, 29 of block1's 128 concepts were
#: the blank background, split again and again because it is the largest cluster)
IDENTICAL_BELOW = 1e-3


class BisectingSphericalKMeans:
    r"""Bisecting spherical k-means (Steinbach et al. 2000; Dhillon & Modha 2001).

    Rows are L2-normalised; starting from one cluster, the largest cluster
    (ties: the lowest index) is split in two with spherical 2-means (cosine
    similarity, centroids are normalised sums) until ``n_clusters`` exist.
    A cluster whose rows all point the same way (such as the PFVs of every
    image's blank background) is never split: its halves would be one
    concept twice.

    Each 2-means starts from the split along the cluster's principal direction
    (Lanczos for large clusters, the power method for batches of smaller
    ones), so the result does not depend on the order
    of the rows, and every step is a sum over rows (which is what lets a
    distributed fit reduce partial sums). How the arithmetic is organised
    depends on the cluster's size; a split depends only on the cluster's own
    rows throughout:

    * clusters of more than :data:`BATCH_SPLIT_ROWS` rows (the first few
      levels of the tree) are split one by one, from a start vector drawn
      from ``seed``; the 2-means of the largest starts from the split of a
      sample of their rows (chosen by the rows' values), so that only a few
      of its passes read all the rows;
    * smaller ones are split many at a time (the clusters the fit will ask
      for next, together), from the row farthest from the cluster's mean;
      those of at most :data:`SMALL_SPLIT_ROWS` rows -- most of the splits
      when K is large -- in their row space, from Gram matrices computed once
      and cut into blocks for the clusters split off them.

    Args:
        n_clusters (int): number of clusters K.
        max_iter (int, optional): 2-means iterations per split. Default: 50
        tol (float, optional): a 2-means stops once an iteration raises the
                    summed cosine of the cluster's rows to their centroid by
                    at most ``tol`` per row (or no row changes side).
                    Default: 3e-5
        power_iter (int, optional): at most this many products with the
                    cluster's covariance (Lanczos or power steps) for the
                    principal direction. Default: 20
        seed (int, optional): seed of the start vectors of the large
                    clusters. Default: 0
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

    def __init__(
        self,
        n_clusters: int,
        *,
        max_iter: int = 50,
        tol: float = 3e-5,
        power_iter: int = 20,
        seed: int = 0,
        progress: bool = False,
    ):
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.tol = tol
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
        if not (isinstance(self.tol, (int, float)) and self.tol >= 0):
            raise ValueError(f"tol must be a non-negative number; got {self.tol!r}")
        with torch.inference_mode():  # thousands of small ops: no autograd bookkeeping
            labels, centers, history = self._fit(X, n, k)
        # inference tensors cannot be changed outside inference mode: hand out ordinary ones
        self.labels_ = labels.clone()
        self.cluster_centers_ = centers.clone()
        self.counts_ = torch.bincount(self.labels_, minlength=k)
        self.split_history_ = history
        return self

    def _fit(self, X: Tensor, n: int, k: int) -> Tuple[Tensor, Tensor, List[Tuple[int, int]]]:
        if _dist.is_distributed() and n <= _dist.LOCAL_FIT_ROWS:
            # every process holds all rows: fitting them on its own beats thousands of latency-bound
            # collectives (7x at 2,048 x 1,024, K = 1,024, 2 Gloo processes) and gives the single-process fit
            with _dist.local_only():
                return self._fit(X, n, k)
        Y = torch.nn.functional.normalize(X, dim=1)
        # distributed: this process works on rows rank, rank + W, ... (every sum goes through _reduce)
        rows = _dist.shard_indices(n).to(X.device) if _dist.is_distributed() else torch.arange(n, device=X.device)
        if _dist.is_distributed():
            Y = Y[rows]
        members: List[Tensor] = [torch.arange(Y.shape[0], device=X.device)]
        history: List[Tuple[int, int]] = []
        with tqdm(total=k - 1, disable=not self.progress or not _dist.is_main_process(), desc="bisecting k-means", unit="split") as bar:
            self._loop(Y, rows, members, history, n, k, bar)
        labels = torch.empty(Y.shape[0], dtype=torch.long, device=X.device)
        sizes = torch.tensor([idx.shape[0] for idx in members], device=X.device)
        labels[torch.cat(members)] = torch.repeat_interleave(torch.arange(k, device=X.device), sizes)
        if _dist.is_distributed():  # every process gets all labels, in row order
            full = torch.empty(n, dtype=torch.long, device=X.device)
            full[torch.cat(_dist.all_gather(rows))] = torch.cat(_dist.all_gather(labels))
            labels, Y = full, torch.nn.functional.normalize(X, dim=1)
        centers = torch.zeros(k, X.shape[1], dtype=X.dtype, device=X.device).index_add_(0, labels, Y)
        return labels, torch.nn.functional.normalize(centers, dim=1), history

    def _loop(self, Y: Tensor, rows: Tensor, members: List[Tensor], history: List[Tuple[int, int]], n: int, k: int, bar) -> None:
        local = not _dist.is_distributed()
        heap: List[Tuple[int, int]] = [(-n, 0)]
        ready: Dict[int, Tuple[Tensor, Tensor, Tuple[int, int]]] = {}  # clusters split ahead of their turn
        batched = max(BATCH_SPLIT_ROWS, _gram_split_rows(Y.shape[1]))
        grams = _GramStore(n, Y.device)
        while len(members) < k:
            if not heap:
                raise ValueError(f"the PFVs have only {len(members)} distinct directions (clusters of equal rows "
                                 f"are not split); n_clusters={k} is too many")
            neg_size, j = heapq.heappop(heap)
            idx = members[j]
            if -neg_size < 2 or self._identical(Y, idx):
                # its halves would be one concept twice (e.g. the background positions of every image):
                # the cluster stays whole and the next largest is split instead
                ready.pop(j, None)
                continue
            history.append((j, -neg_size))
            if -neg_size <= batched:
                if j not in ready:
                    # the clusters that may be split next: the largest ones, as many as splits remain
                    # (a split's children can overtake some of them; those splits are wasted, not wrong)
                    later = heapq.nsmallest(k - len(members) - 1, heap)
                    batch = [j] + [c for s, c in later if s <= -2 and c not in ready]
                    ready.update(zip(batch, _dist.split_batch(self, Y, rows, [members[c] for c in batch], grams)))
                members[j], new, sizes = ready.pop(j)
            elif local:  # single process: no wrappers, sizes are the local row counts
                right = self._split_local(Y if idx.shape[0] == Y.shape[0] else Y.index_select(0, idx), len(history) - 1)
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

    def _identical(self, Y: Tensor, idx: Tensor) -> bool:
        """Whether the cluster's (unit) rows are one direction: their mean cosine distance to the centroid
        is below :data:`IDENTICAL_BELOW`."""
        part = Y.index_select(0, idx)
        total = self._reduce(part.sum(0, dtype=torch.float64))
        # the centroid's cosine summed over rows is ||sum||; rows minus it is the summed distance
        n = self._reduce(torch.tensor([float(part.shape[0])], dtype=torch.float64, device=Y.device))[0]
        return float(n - total.norm()) < IDENTICAL_BELOW * float(n)

    def _start_vector(self, c: int, split_number: int, like: Tensor) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + split_number)
        return torch.randn(c, generator=g, dtype=torch.float64).to(device=like.device, dtype=like.dtype)

    def _split(self, Y: Tensor, split_number: int, row_ids: Optional[Tensor] = None, sample: bool = True) -> Tensor:
        """Boolean mask of the rows of ``Y`` (unit rows) that form the new cluster."""
        if not _dist.is_distributed():
            return self._split_local(Y, split_number, sample)
        red = self._reduce
        m = red(torch.tensor(float(Y.shape[0]), dtype=torch.float64, device=Y.device)).item()
        total = red(Y.sum(0))
        mean = total / m
        Yt = Y.t()
        right = None
        if sample and m > _SAMPLE_ABOVE:  # a large cluster: start from the split of a sample of it (see _split_local)
            chosen = _sample(Y, _SAMPLE_ROWS / m, self._start_vector(Y.shape[1], split_number, Y))
            if red(chosen.sum().to(torch.float64)) >= 2:
                part = Y[chosen]
                moving = self._split(part, split_number, row_ids[chosen] if row_ids is not None else None, sample=False)
                s1 = red(part[moving].sum(0))
                d = torch.nn.functional.normalize(s1, dim=0) - torch.nn.functional.normalize(red(part.sum(0)) - s1, dim=0)
                right = Y @ d > 0
                if not _both_sides(right, red):
                    right = None
        if right is None:
            # principal direction of the centred rows: Y' (Y x - mean.x) = Yc' Yc x, as the rows' centred sum is 0
            v = _lanczos_directions(lambda x: red(Yt @ (Y @ x[0] - mean @ x[0])).unsqueeze(0),
                                    self._start_vector(Y.shape[1], split_number, Y).unsqueeze(0), self.power_iter)[0]
            right = (Y @ v - mean @ v) > 0
            if not _both_sides(right, red):
                right = _alternate(Y.shape[0], row_ids, Y.device)
        # spherical 2-means
        s1 = red(Yt @ right.to(Y.dtype))
        objective = None
        for _ in range(self.max_iter):
            centroids, objective = _centroids(total, s1, objective, self.tol * m)
            if centroids is None:
                break
            new_right = Y @ (centroids[1] - centroids[0]) > 0
            joined, left = new_right & ~right, right & ~new_right
            changed = red((joined | left).sum().to(Y.dtype))
            if not _both_sides(new_right, red) or changed == 0:
                break
            s1 = s1 + red(Y[joined].sum(0) - Y[left].sum(0))  # only the rows that moved
            right = new_right
        return right

    def _split_local(self, Y: Tensor, split_number: int, sample: bool = True) -> Tensor:
        """:meth:`_split` in a single process: the same arithmetic in the same order, so the
        same mask, without the reduction wrappers and with one host sync per test."""
        m = Y.shape[0]
        total = Y.sum(0)
        mean = total / m
        Yt = Y.t()
        right = None
        if sample and m > _SAMPLE_ABOVE:
            # a large cluster: start the 2-means from the split of a sample of it, which lies near the end of
            # the 2-means over all rows, so only a few passes over them remain (each one leaves the cache)
            chosen = _sample(Y, _SAMPLE_ROWS / m, self._start_vector(Y.shape[1], split_number, Y))
            if int(chosen.sum()) >= 2:
                part = Y[chosen]
                moving = self._split_local(part, split_number, sample=False)
                s1 = part[moving].sum(0)
                d = torch.nn.functional.normalize(s1, dim=0) - torch.nn.functional.normalize(part.sum(0) - s1, dim=0)
                right = Y @ d > 0
                k = int(right.sum())
                if k == 0 or k == m:
                    right = None
        if right is None:
            v = _lanczos_directions(lambda x: (Yt @ (Y @ x[0] - mean @ x[0])).unsqueeze(0),
                                    self._start_vector(Y.shape[1], split_number, Y).unsqueeze(0), self.power_iter)[0]
            right = (Y @ v - mean @ v) > 0
            k = int(right.sum())
            if k == 0 or k == m:
                right = torch.arange(m, device=Y.device) % 2 == 1
        s1 = Yt @ right.to(Y.dtype)
        objective = None
        for _ in range(self.max_iter):
            centroids, objective = _centroids(total, s1, objective, self.tol * m)
            if centroids is None:
                break
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

    def _split_batch(
        self, Y: Tensor, clusters: List[Tensor], grams: Optional["_GramStore"] = None, keys: Optional[List[Tensor]] = None
    ) -> List[Tuple[Tensor, Tensor]]:
        """Split many clusters at once: for each index tensor into ``Y``, its rows that stay and those that move.

        The split rule of :meth:`_split_local`, batched over the clusters
        padded to one width (zero rows pad), in parts of at most
        ``_BATCH_ELEMENTS`` elements. Every step is per cluster -- the start
        (the row farthest from the cluster's mean), the power iteration, the
        2-means -- so a cluster's result depends only on its own rows, not
        on the batch it is in. Clusters of at most ``_gram_split_rows(C)``
        rows are split in their row space (:meth:`_split_gram`), larger ones
        in the channel space (:meth:`_split_rows`).

        Args:
            grams: Gram matrices kept from earlier calls (a cluster split off
                an earlier one reuses its block); a fresh store if None.
            keys: for each cluster, the keys of its rows in ``grams`` (their
                row numbers in the whole data); ``clusters`` if None.

        Returns:
            list of (Tensor, Tensor): per cluster, the entries of its index
            tensor that stay and those that form the new cluster, in order.
        """
        grams = grams if grams is not None else _GramStore(Y.shape[0], Y.device)
        keys = clusters if keys is None else keys
        c = Y.shape[1]
        gram_rows = _gram_split_rows(c)
        out: List[Tuple[Tensor, Tensor]] = [None] * len(clusters)  # type: ignore[list-item]
        groups: Dict[Tuple[bool, int], List[int]] = {}
        for i, idx in enumerate(clusters):
            gram = idx.shape[0] <= gram_rows
            groups.setdefault((gram, _padded_width(idx.shape[0], gram)), []).append(i)
        for (gram, width), group in groups.items():
            per = max(1, _BATCH_ELEMENTS // (width * max(width, c)))
            for start in range(0, len(group), per):
                ids = group[start : start + per]
                lengths = torch.tensor([clusters[i].shape[0] for i in ids], device=Y.device)
                real = torch.arange(width, device=Y.device) < lengths.unsqueeze(1)
                index = torch.zeros((len(ids), width), dtype=torch.long, device=Y.device)
                index[real] = torch.cat([clusters[i].to(Y.device) for i in ids])
                if gram:
                    key = torch.zeros_like(index)
                    key[real] = torch.cat([keys[i].to(Y.device) for i in ids])
                    right = self._split_gram(grams.batch(Y, index, key, real), real, lengths)
                else:
                    Z = Y.index_select(0, index.view(-1)).view(len(ids), width, c)
                    right = self._split_rows(Z.mul_(real.unsqueeze(2).to(Z.dtype)), real, lengths)
                # every cluster's staying rows, then its moving rows, then padding: one sort, one split
                side = torch.where(real, right.to(torch.uint8), torch.full_like(right, 2, dtype=torch.uint8))
                parted = index.gather(1, side.argsort(dim=1, stable=True))[real]
                moving = right.sum(1)
                pieces = parted.split(torch.stack([lengths - moving, moving], 1).view(-1).tolist())
                for row, i in enumerate(ids):
                    out[i] = (pieces[2 * row], pieces[2 * row + 1])
        return out

    def _split_rows(self, Z: Tensor, real: Tensor, lengths: Tensor) -> Tensor:
        """The split of each cluster of a batch from its unit rows ``Z (b, w, C)`` (zero rows pad)."""
        b, width = real.shape
        n = lengths.to(Z.dtype).view(b, 1)

        def rows_times(x: Tensor) -> Tensor:  # (b, C) -> (b, w): Z x; a column bmm is 10x faster as a view
            return (Z @ x.unsqueeze(1).transpose(1, 2)).squeeze(2)

        def times_rows(p: Tensor) -> Tensor:  # (b, w) -> (b, C): Z' p
            return (p.unsqueeze(1) @ Z).squeeze(1)

        total = Z.sum(1)
        mean = total / n
        centred_dot = lambda x: (rows_times(x) - (mean * x).sum(1, keepdim=True)) * real  # noqa: E731
        # power iteration from the row farthest from the mean; Z' (Z x - mean.x) = Zc' Zc x, as the centred
        # rows sum to 0
        cosine = rows_times(mean)
        far = torch.where(real, cosine, torch.full_like(cosine, float("inf"))).argmin(1)
        start = Z[torch.arange(b, device=Z.device), far] - mean
        v = _power_directions(lambda x: times_rows(centred_dot(x)), start, self.power_iter)
        right = (centred_dot(v) > 0) & real
        k = right.sum(1)
        alternate = (torch.arange(width, device=Z.device) % 2 == 1) & real
        right = torch.where(((k == 0) | (k == lengths)).unsqueeze(1), alternate, right)
        # spherical 2-means, as in _split_local
        s1 = times_rows(right.to(Z.dtype))
        active = torch.ones(b, dtype=torch.bool, device=Z.device)
        objective = torch.full((b,), -float("inf"), dtype=Z.dtype, device=Z.device)
        for _ in range(self.max_iter):
            s0 = total - s1
            norm1, norm0 = s1.norm(dim=1, keepdim=True), s0.norm(dim=1, keepdim=True)
            now = (norm0 + norm1).squeeze(1)
            active = active & (now - objective > self.tol * lengths)
            objective = now
            new_right = (rows_times(s1 / norm1.clamp_min(1e-12) - s0 / norm0.clamp_min(1e-12)) > 0) & real
            k = new_right.sum(1)
            moved = active & (k > 0) & (k < lengths) & (new_right != right).any(1)
            if not bool(moved.any()):
                break
            s1 = s1 + times_rows((new_right.to(Z.dtype) - right.to(Z.dtype)) * moved.unsqueeze(1))
            right = torch.where(moved.unsqueeze(1), new_right, right)
            active = moved
        return right

    def _split_gram(self, G: Tensor, real: Tensor, lengths: Tensor) -> Tensor:
        """The split of each cluster of a batch from its Gram matrix ``G (b, w, w)`` (zero on padding)."""
        b, width = real.shape
        realf = real.to(G.dtype)
        n = lengths.to(G.dtype).view(b, 1)

        def mv(M: Tensor, x: Tensor) -> Tensor:  # batched M @ x for a symmetric M: a row-vector bmm
            return (x.unsqueeze(1) @ M).squeeze(1)

        def centred(x: Tensor) -> Tensor:  # H x, H the centring projection on the cluster's rows
            return (x - (x * realf).sum(1, keepdim=True) / n) * realf

        def gram_centred(x: Tensor) -> Tensor:  # H G H x: the centred rows' Gram matrix, never formed
            return centred(mv(G, centred(x)))

        r = G.sum(2)  # y_i . (sum of the cluster's rows)
        # the centred Gram matrix's principal eigenvector holds the rows' projections on the cluster's
        # principal direction; start from its column of the row farthest from the mean (as _split_rows)
        far = torch.where(real, r, torch.full_like(r, float("inf"))).argmin(1)
        start = gram_centred(torch.nn.functional.one_hot(far, width).to(G.dtype))
        v = _power_directions(gram_centred, start, self.power_iter)
        right = (gram_centred(v) > 0) & real
        k = right.sum(1)
        alternate = (torch.arange(width, device=G.device) % 2 == 1) & real
        right = torch.where(((k == 0) | (k == lengths)).unsqueeze(1), alternate, right)
        # spherical 2-means: y_i . s = (G 1_S)_i and |s|^2 = 1_S' G 1_S for the sum s of the rows in S
        active = torch.ones(b, dtype=torch.bool, device=G.device)
        objective = torch.full((b,), -float("inf"), dtype=G.dtype, device=G.device)
        for _ in range(self.max_iter):
            on = right.to(G.dtype)
            g1 = mv(G, on)
            g0 = r - g1
            norm1 = (g1 * on).sum(1, keepdim=True).clamp_min(0).sqrt()
            norm0 = (g0 * (realf - on)).sum(1, keepdim=True).clamp_min(0).sqrt()
            now = (norm0 + norm1).squeeze(1)
            active = active & (now - objective > self.tol * lengths)  # as in _split_local
            objective = now
            new_right = (g1 / norm1.clamp_min(1e-12) - g0 / norm0.clamp_min(1e-12) > 0) & real
            k = new_right.sum(1)
            moved = active & (k > 0) & (k < lengths) & (new_right != right).any(1)
            if not bool(moved.any()):
                break
            right = torch.where(moved.unsqueeze(1), new_right, right)
            active = moved
        return right


class _GramStore:
    """Gram matrices of the unit rows of small clusters, kept for the clusters split off them.

    The first time a cluster is split on the Gram path its Gram matrix is
    computed from its rows. Every cluster split off it later has its rows
    among its parent's, so its Gram matrix is a block of the one its parent
    was split with: the C channels are read once per row, not once per
    split. Each batch's Gram matrices become the home of its clusters' rows
    (so a block is cut from the parent's, not from a far larger ancestor's),
    and a batch no row lives in any more is dropped. Rows are known by a key,
    their row number in the whole data, so a distributed fit, which gathers
    the rows anew for every batch, finds them too.
    """

    def __init__(self, n_rows: int, device):
        self.packs: Dict[int, Tensor] = {}  # (b, w, w) Gram matrices of a batch, zero on padding
        self.rows: Dict[int, int] = {}  # how many rows live in each
        self.pack = torch.full((n_rows,), -1, dtype=torch.long, device=device)  # per key: the pack it lives in,
        self.slot = torch.zeros(n_rows, dtype=torch.long, device=device)  # its cluster's place in the pack,
        self.pos = torch.zeros(n_rows, dtype=torch.long, device=device)  # its row in that Gram matrix
        self._next = 0

    def batch(self, Y: Tensor, index: Tensor, key: Tensor, real: Tensor) -> Tensor:
        """``(b, w, w)`` Gram matrices of clusters: their rows ``index (b, w)`` into ``Y``, keys ``key (b, w)``
        and mask ``real (b, w)`` (padding: any index and key, False)."""
        b, width = index.shape
        groups: Dict[int, List[int]] = {}
        for i, p in enumerate(self.pack[key[:, 0]].tolist()):
            groups.setdefault(p, []).append(i)
        G = torch.zeros((b, width, width), dtype=Y.dtype, device=Y.device)
        for p, members in groups.items():
            sel = torch.tensor(members, device=Y.device)
            on = real[sel]
            if p < 0:  # new: from the rows, each cluster at its own size (padding would cost up to 4x)
                lengths = on.sum(1).tolist()
                rows = Y.index_select(0, index[sel][on]).split(lengths)
                for i, Z in zip(members, rows):
                    G[i, : Z.shape[0], : Z.shape[0]] = Z @ Z.t()
            else:  # a block of the Gram matrix the cluster's rows live in
                at = self.pos[key[sel]] * on
                block = self.packs[p][self.slot[key[sel][:, 0]].unsqueeze(1), at]  # (b', w, w of the pack)
                G[sel] = block.gather(2, at.unsqueeze(1).expand(-1, width, -1)).mul_((on.unsqueeze(2) & on.unsqueeze(1)).to(Y.dtype))
                self.rows[p] -= int(on.sum())  # these rows move to this batch's Gram matrices
                if self.rows[p] == 0:  # no row lives in that batch's Gram matrices any more
                    del self.packs[p], self.rows[p]
        keys = key[real]
        self.pack[keys] = self._next
        self.slot[keys] = torch.arange(b, device=Y.device).unsqueeze(1).expand_as(real)[real]
        self.pos[keys] = torch.arange(width, device=Y.device).expand_as(real)[real]
        self.packs[self._next], self.rows[self._next] = G, keys.shape[0]
        self._next += 1
        return G


def _lanczos_directions(apply: Callable[[Tensor], Tensor], start: Tensor, steps: int) -> Tensor:
    """Unit principal eigenvectors ``(b, d)`` of ``b`` symmetric positive semi-definite operators, by Lanczos.

    For clusters whose products stream many rows: Lanczos needs fewer
    products than the power method for the same accuracy. ``apply`` maps
    ``(b, d)`` vectors to their images. Full reorthogonalisation; each
    operator stops once its top Ritz pair's residual is below
    ``_LANCZOS_TOL`` of its Ritz value, or after ``steps`` products. Every
    decision depends only on ``apply``'s values, so an operator's result does
    not depend on the others in the batch, and processes that all-reduce
    inside ``apply`` take the same steps.
    """
    b, d = start.shape
    steps = max(1, steps)
    Q = start.new_zeros(b, steps, d)
    Q[:, 0] = start / start.norm(dim=1, keepdim=True).clamp_min(1e-30)
    T = torch.zeros(b, steps, steps, dtype=torch.float64)  # small eigenproblems: on the host, in float64
    ritz = torch.zeros(b, steps, dtype=torch.float64)
    active = torch.ones(b, dtype=torch.bool)
    for j in range(steps):
        w = apply(Q[:, j])
        T[:, j, j] = (w * Q[:, j]).sum(1).cpu().double()
        basis = Q[:, : j + 1]
        w = w - ((w.unsqueeze(1) @ basis.transpose(1, 2)) @ basis).squeeze(1)
        beta = w.norm(dim=1)
        beta_host = beta.cpu().double()
        theta, S = torch.linalg.eigh(T[:, : j + 1, : j + 1])
        top = S[:, :, -1]
        done = active & ((beta_host * top[:, -1].abs() <= _LANCZOS_TOL * theta[:, -1]) | (theta[:, -1] <= 0))
        if j == steps - 1:
            done = active
        ritz[done, : j + 1] = top[done]
        active = active & ~done
        if not bool(active.any()):
            break
        T[:, j, j + 1] = T[:, j + 1, j] = beta_host * active
        Q[:, j + 1] = w * (active.to(w.device) / beta.clamp_min(1e-30)).unsqueeze(1)
    v = (ritz.to(device=Q.device, dtype=Q.dtype).unsqueeze(1) @ Q).squeeze(1)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _power_directions(apply: Callable[[Tensor], Tensor], start: Tensor, steps: int) -> Tensor:
    """Unit principal eigenvectors ``(b, d)`` of ``b`` symmetric positive semi-definite operators, by the power method.

    For many small clusters at once, where a product is cheap and a Lanczos
    step's small eigenproblems are not. ``apply`` maps ``(b, d)`` vectors to
    their images; an operator stops once its vector turns by less than
    ``_POWER_TOL`` (1 - |cos|), so its result does not depend on the others.
    """
    b = start.shape[0]
    near_one = torch.tensor(1 - _POWER_TOL, dtype=start.dtype).item()
    v = start / start.norm(dim=1, keepdim=True).clamp_min(1e-30)
    active = torch.ones(b, dtype=torch.bool, device=start.device)
    for _ in range(steps):
        w = apply(v)
        norm = w.norm(dim=1, keepdim=True)
        moving = active.view(b, 1) & (norm > 0)
        w = w / norm.clamp_min(1e-30)
        converged = (w * v).sum(1).abs() > near_one
        v = torch.where(moving, w, v)
        active = active & moving.view(b) & ~converged
        if not bool(active.any()):
            break
    return v


def _centroids(total: Tensor, s1: Tensor, objective: Optional[float], slack: float) -> Tuple[Optional[Tensor], float]:
    """The 2-means' unit centroids ``(2, C)`` of the rows outside and inside ``s1`` (their sums), and the
    summed cosine of the rows to them; None for the centroids once that grew by at most ``slack``."""
    sums = torch.stack([total - s1, s1])
    norms = sums.norm(dim=1, keepdim=True)
    now = float(norms.sum())
    if objective is not None and now - objective <= slack:
        return None, now
    return sums / norms.clamp_min(1e-12), now


def _sample(Y: Tensor, fraction: float, direction: Tensor) -> Tensor:
    """Mask of about ``fraction`` of the rows, chosen by their values, not their order or number: the
    fractional part of a fine multiple of each row's projection on a random direction is close to
    uniform, and a row is chosen when it is below ``fraction`` (equal rows go together)."""
    return torch.remainder(Y @ direction * 4096, 1.0) < fraction


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
        if not all_finite(vectors):
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
