"""Data-parallel stages under torch.distributed (Gloo, 2 CPU processes) equal single-process results."""

import os
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

from captum_gig import BisectingSphericalKMeans, ConceptBasis, PFVDecomposer, alpha_max, collect_pfvs
from captum_gig import concepts as concepts_
from captum_gig import distributed as dist_
from captum_gig._data import iter_batches, iter_shard
from captum_gig.aggregate import class_attribution, interlayer_attribution

from helpers import SmallCNN, randomize_bn

WORLD = 2


def _workload():
    """The same model and data in every process."""
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN(channels=(4, 6, 8), num_classes=4)).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(12, 3, 12, 12, generator=g)
    labels = torch.randint(0, 4, (12,), generator=g)
    blobs = torch.cat([torch.randn(10, 5, generator=g), torch.ones(7, 5)])  # 7 identical rows: degenerate splits
    return model, images, labels, blobs


def _pipeline(model, images, labels, blobs):
    """Every distributed stage; returns flat tensors to compare."""
    loader = DataLoader(TensorDataset(images, labels), batch_size=3)  # 4 batches
    pfvs = collect_pfvs(model, "block2", loader, per_image=3, seed=5, progress=False)
    uniform = collect_pfvs(model, "block3", images, sampling="uniform", per_image=2, batch_size=5, seed=2, progress=False)
    defaults = dist_.LOCAL_SPLIT_ROWS, concepts_.BATCH_SPLIT_ROWS, concepts_.SMALL_SPLIT_ROWS
    whole = dist_.LOCAL_FIT_ROWS
    km_whole = BisectingSphericalKMeans(9, seed=1).fit(blobs)  # 17 rows: fitted whole by every process
    dist_.LOCAL_FIT_ROWS = 0  # the fits below are sharded
    # clusters of >= 10 rows split with all-reduced sums, smaller ones gathered (single-process: no effect),
    # those of <= 6 rows gathered and split in batches, those of <= 4 in their row space
    dist_.LOCAL_SPLIT_ROWS, concepts_.BATCH_SPLIT_ROWS, concepts_.SMALL_SPLIT_ROWS = 10, 6, 4
    basis = ConceptBasis.fit(pfvs, 12, offset="mean", seed=3, progress=False)
    alpha = 0.1 * float(alpha_max(basis, pfvs.vectors).median())
    dec = PFVDecomposer(basis, alpha=alpha, chunk_size=8)  # 36 rows: 5 chunks
    U = dec.transform(pfvs.vectors, distributed=True)
    res = class_attribution(model, "block2", dec, loader, by="label", n_steps=4, progress=False)
    basis3 = ConceptBasis.fit(uniform, 6, offset=model.block3[1], seed=0, progress=False)
    inter = interlayer_attribution(model, "block2", dec, "block3", basis3, images, targets=[0, 2, 5], by="all",
                                   n_steps=2, batch_size=5, progress=False)
    # every split on sharded rows, also the degenerate ones
    dist_.LOCAL_SPLIT_ROWS, concepts_.BATCH_SPLIT_ROWS, concepts_.SMALL_SPLIT_ROWS = 0, 0, 0
    km = BisectingSphericalKMeans(9, seed=1).fit(blobs)
    sampling = concepts_._SAMPLE_ABOVE, concepts_._SAMPLE_ROWS
    concepts_._SAMPLE_ABOVE, concepts_._SAMPLE_ROWS = 8, 6  # the 2-means of clusters > 8 rows start from a sample's
    km_sampled = BisectingSphericalKMeans(9, seed=1).fit(blobs)
    concepts_._SAMPLE_ABOVE, concepts_._SAMPLE_ROWS = sampling
    dist_.LOCAL_SPLIT_ROWS = 10**9  # every split gathered
    km_gathered = BisectingSphericalKMeans(9, seed=1).fit(blobs)
    concepts_.BATCH_SPLIT_ROWS = 10**9  # every split gathered and batched, in the channel space
    km_batched = BisectingSphericalKMeans(9, seed=1).fit(blobs)
    concepts_.SMALL_SPLIT_ROWS = 10**9  # every split gathered and batched, in the row space
    km_gram = BisectingSphericalKMeans(9, seed=1).fit(blobs)
    dist_.LOCAL_SPLIT_ROWS, concepts_.BATCH_SPLIT_ROWS, concepts_.SMALL_SPLIT_ROWS = defaults
    dist_.LOCAL_FIT_ROWS = whole
    out = {"km_whole_labels": km_whole.labels_, "centres": km.cluster_centers_, "km_gathered_labels": km_gathered.labels_, "km_batched_labels": km_batched.labels_,
           "km_gram_labels": km_gram.labels_, "km_sampled_labels": km_sampled.labels_,
           "km_labels": km.labels_, "split_sizes": torch.tensor(km.split_history_),
           "vectors": basis.vectors, "offset": basis.offset, "basis_labels": basis.labels, "sizes": basis.sizes,
           "U": U, "classes": res.classes, "mean": res.mean, "counts": res.counts,
           "inter_mean": inter.mean, "inter_counts": inter.counts, "basis3": basis3.vectors}
    for name, s in (("pfv", pfvs), ("upfv", uniform)):
        for field, t in s._fields().items():
            out[f"{name}_{field}"] = t
    return {k: v.contiguous() for k, v in out.items() if v is not None}


def _worker(rank, port, folder):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        assert dist_.is_distributed() and dist_.world_size() == WORLD and dist_.rank() == rank
        out = _pipeline(*_workload())
        out["local_shard"] = dist_.shard_indices(7)
        save_file(out, os.path.join(folder, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_equal_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        assert not dist_.is_distributed()
        single = _pipeline(*_workload())
    finally:
        torch.set_num_threads(threads)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    assert ranks[0]["local_shard"].tolist() == [0, 2, 4, 6] and ranks[1]["local_shard"].tolist() == [1, 3, 5]
    exact = {"km_labels", "km_gathered_labels", "km_batched_labels", "km_gram_labels", "km_sampled_labels", "split_sizes", "basis_labels", "sizes", "classes", "counts", "inter_counts"}
    exact |= {k for k in single if k.endswith(("_image_index", "_position", "_labels", "_target"))}
    assert single["pfv_vectors"].shape == (36, 6) and single["upfv_vectors"].shape == (24, 8)
    assert single["classes"].numel() >= 2 and int((single["U"] != 0).sum()) > 0
    for got in ranks:
        for key, want in single.items():
            if key in exact:
                assert torch.equal(got[key], want), key
            else:
                torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=key)


class _Shardable:
    """Batches that a rank can load alone, through ``shard(rank, world_size)``."""

    def __init__(self, images, size):
        self.images, self.size, self.loaded = images, size, []

    def __len__(self):
        return (self.images.shape[0] + self.size - 1) // self.size

    def __iter__(self):
        return (self.images[i : i + self.size] for i in range(0, self.images.shape[0], self.size))

    def shard(self, rank, world_size):
        for number in range(rank, len(self), world_size):
            self.loaded.append(number)
            yield number * self.size, self.images[number * self.size : (number + 1) * self.size]


@pytest.mark.parametrize("kind", ["tensor", "loader", "iterable", "shardable"])
def test_shards_cover_every_batch_once(kind):
    images = torch.arange(23.0).view(23, 1, 1, 1).expand(23, 1, 2, 2)
    labels = torch.arange(23)
    data = {
        "tensor": images,
        "loader": DataLoader(TensorDataset(images, labels), batch_size=4),
        "iterable": [(images[i : i + 4], labels[i : i + 4]) for i in range(0, 23, 4)],
        "shardable": _Shardable(images, 4),
    }[kind]
    single = [(s, im) for s, im, _ in iter_shard(data, 4)]
    assert [s for s, _ in single] == list(range(0, 23, 4))
    assert torch.equal(torch.cat([im for _, im in single]), images)
    for world in (2, 3, 7):
        seen = sorted((s, im[:, 0, 0, 0].tolist()) for r in range(world) for s, im, _ in iter_shard(data, 4, r, world))
        assert seen == [(s, im[:, 0, 0, 0].tolist()) for s, im in single]
        for r in range(world):  # rank r takes batches r, r + W, ...
            assert [s for s, _, _ in iter_shard(data, 4, r, world)] == list(range(4 * r, 23, 4 * world))
    assert [b.shape[0] for b, _ in iter_batches(data, 4)] == [4, 4, 4, 4, 4, 3]
    if kind == "shardable":  # each rank loaded only its own batches
        data.loaded.clear()
        list(iter_shard(data, 4, 1, 3))
        assert data.loaded == [1, 4]


def test_single_process_helpers_are_no_ops():
    t = torch.arange(5.0)
    assert not dist_.is_distributed() and dist_.rank() == 0 and dist_.world_size() == 1 and dist_.is_main_process()
    assert dist_.all_reduce(t) is t and dist_.all_gather(t)[0] is t
    assert dist_.all_gather_object({"a": 1}) == [{"a": 1}] and dist_.broadcast_object(3) == 3
    assert dist_.shard_indices(7, 1, 3).tolist() == [1, 4]
    assert dist_.init_from_env() is False  # no WORLD_SIZE: nothing to join
    with dist_.local_only():
        assert not dist_.is_distributed()
    with pytest.raises(ValueError, match="rank"):
        dist_.shard_indices(7, 3, 3)
    shuffled = DataLoader(TensorDataset(torch.zeros(4, 1, 2, 2)), batch_size=2, shuffle=True)
    with pytest.raises(ValueError, match="shuffle"):
        list(iter_shard(shuffled, 2, 0, 2))


CLI_MODEL = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("block1", nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU()))
    model.add_module("block2", nn.Sequential(nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2)))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("head", nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()
'''


@pytest.mark.slow
def test_cli_under_torchrun_writes_the_single_process_artifacts(tmp_path):
    import json
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    (tmp_path / "model.py").write_text(CLI_MODEL)
    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b", "c"]):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(5):
            img = rng.integers(0, 80, size=(12, 12, 3))
            img[..., c] += 150
            Image.fromarray(img.astype(np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
    args = ["run", "--model", f"module:{tmp_path / 'model.py'}:build", "--data", str(tmp_path / "images"),
            "--layers", "block1", "block2", "--image-size", "12", "--by", "label", "--per-image", "3",
            "--concepts", "6", "--n-steps", "4", "--batch-size", "4", "--device", "cpu", "--quiet",
            "--eval-images", "9", "--eval-steps", "3", "--atlas-top", "1", "--ierf", "ixg"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    one = subprocess.run([sys.executable, "-m", "captum_gig", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "captum_gig", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    with open(tmp_path / "two" / "manifest.json") as f:
        assert json.load(f)["world_size"] == 2
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.safetensors"))
    assert len(files) >= 7  # predictions, PFVs, bases, coefficients of 2 layers, class attribution(s)
    # graph (each rank builds the atlases of its share of the layers) and evaluate (of its share of the classes)
    made = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file()
                  and p.suffix != ".log" and p.name not in ("manifest.json", "timings.json"))
    assert made == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file()
                          and p.suffix != ".log" and p.name not in ("manifest.json", "timings.json"))
    assert any(p.parts[0] == "atlas" for p in made) and len({p.parts[1] for p in made if p.parts[0] == "atlas"}) == 2

    def close(want, got, where):
        if isinstance(want, dict):
            assert sorted(want) == sorted(got), where
            for k in want:
                close(want[k], got[k], f"{where}.{k}")
        elif isinstance(want, list):
            assert len(want) == len(got), where
            for i, (w, g) in enumerate(zip(want, got)):
                close(w, g, f"{where}[{i}]")
        elif isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6), where
        else:
            assert want == got, where

    with open(tmp_path / "one" / "evaluation" / "metrics.json") as f, \
            open(tmp_path / "two" / "evaluation" / "metrics.json") as g:
        want, got = json.load(f), json.load(g)
    assert want["curves"] and want["n_images"] == 9
    close(want, got, "metrics")
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.safetensors"))
    for rel in files:
        want, got = load_file(str(tmp_path / "one" / rel)), load_file(str(tmp_path / "two" / rel))
        assert sorted(want) == sorted(got), rel
        for key, w in want.items():
            if w.is_floating_point():
                scale = float(w.abs().max()) if w.numel() else 1.0
                torch.testing.assert_close(got[key], w, rtol=1e-5, atol=1e-6 * scale, msg=f"{rel}:{key}")
            else:
                assert torch.equal(got[key], w), f"{rel}:{key}"


def _rf_worker(rank, port, folder):
    import torch.distributed as dist

    from captum_gig.ierf import receptive_fields

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = randomize_bn(SmallCNN(channels=(4, 6, 8), num_classes=4)).eval()
        calls = []
        model.register_forward_pre_hook(lambda _m, a: calls.append(a[0].shape[0]))
        boxes = receptive_fields(model, ["block1", "block3"], (3, 12, 12), batch_size=4, distributed=True)
        save_file({"block1": boxes[0], "block3": boxes[1], "probes": torch.tensor(sum(calls))},
                  os.path.join(folder, f"rf{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_receptive_field_probes_are_shared_between_processes(tmp_path):
    import torch.multiprocessing as mp

    from captum_gig.ierf import receptive_fields

    mp.spawn(_rf_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    model = randomize_bn(SmallCNN(channels=(4, 6, 8), num_classes=4)).eval()
    want = receptive_fields(model, ["block1", "block3"], (3, 12, 12))
    ranks = [load_file(str(tmp_path / f"rf{r}.safetensors")) for r in range(WORLD)]
    assert [int(r["probes"]) for r in ranks] == [12, 12]  # the 12 + 12 NaN rows and columns split in two
    for got in ranks:
        assert torch.equal(got["block1"], want[0]) and torch.equal(got["block3"], want[1])
    assert not torch.equal(want[0], want[1])  # two different layers' fields
