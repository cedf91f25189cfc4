"""Speed-up of N CPU processes (Gloo) over one, per dataset-wide stage, on a fixed workload.

Each stage runs through the library's public API exactly as under ``torchrun``;
the script starts the processes itself (``torch.multiprocessing.spawn``) for
world sizes 1 and 2 (``--world 1 2 4`` for more), every process with
``--threads`` intra-op threads (1 by default, so that two processes use two
cores and one process one core: the comparison is of the parallel schedule,
not of thread counts). A stage's time is the slowest rank's, between barriers; the CPU
seconds of the busiest rank are reported as well, since on a shared machine wall time
measures the other jobs as much as this one.
The results also check that every world size produced the same artifacts.

    python benchmarks/distributed.py                 # a few minutes on 2 idle cores
    python benchmarks/distributed.py --quick         # smoke run

Writes ``benchmarks/results/distributed.json``.
"""

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

STAGES = ("collect_pfvs", "concept_fit", "transform", "class_attribution")


class BenchCNN(nn.Module):
    """conv-BN-ReLU blocks and a linear head; ``block2``/``block3`` are the analysed layers."""

    def __init__(self, channels=(16, 32, 48), num_classes=10):
        super().__init__()
        blocks, c_in = [], 3
        for i, c in enumerate(channels):
            blocks.append(nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                        nn.MaxPool2d(2) if i else nn.Identity()))
            c_in = c
        self.block1, self.block2, self.block3 = blocks
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.head(self.block3(self.block2(self.block1(x))).mean((2, 3)))


def workload(args):
    torch.manual_seed(0)
    model = BenchCNN().eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    images = torch.rand(args.images, 3, args.size, args.size, generator=g)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    return model, images, labels


def run_stages(args):
    """All stages on this process's share; returns (seconds per stage, results to compare)."""
    from torch.utils.data import DataLoader, TensorDataset

    from captum_gig import ConceptBasis, PFVDecomposer, alpha_max, collect_pfvs
    from captum_gig import distributed as dist_
    from captum_gig.aggregate import class_attribution

    model, images, labels = workload(args)
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size)
    times, cpu = {}, {}

    def timed(name, fn):
        dist_.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        c1 = time.process_time()
        dist_.barrier()
        times[name] = time.perf_counter() - t0
        # CPU seconds of the busiest rank: what the stage takes on otherwise idle cores
        cpu[name] = float(dist_.all_reduce(torch.tensor(c1 - c0, dtype=torch.float64), op="max"))
        if dist_.is_main_process():
            print(f"  W={dist_.world_size()} {name}: {times[name]:.2f} s wall, {cpu[name]:.2f} s CPU (busiest rank)", flush=True)
        return out

    pfvs = timed("collect_pfvs", lambda: collect_pfvs(model, "block3", loader, per_image=args.per_image, seed=0, progress=False))
    basis = timed("concept_fit", lambda: ConceptBasis.fit(pfvs, min(8 * pfvs.n_channels, len(pfvs) // 8), offset=model.block3[1], seed=0, progress=False))
    alpha = 0.1 * float(alpha_max(basis, pfvs.vectors[:512]).median())
    import inspect

    solver = {"solver": args.solver} if "solver" in inspect.signature(PFVDecomposer).parameters else {}
    dec = PFVDecomposer(basis, alpha=alpha, chunk_size=args.chunk_size, **solver)
    U = timed("transform", lambda: dec.transform(pfvs.vectors, distributed=True))
    attr_loader = DataLoader(TensorDataset(images[: args.gig_images], labels[: args.gig_images]), batch_size=args.batch_size)
    res = timed("class_attribution", lambda: class_attribution(model, "block3", dec, attr_loader, by="label",
                                                                n_steps=args.n_steps, progress=False))
    results = {"image_index": pfvs.image_index, "position": pfvs.position, "vectors": pfvs.vectors,
               "basis_labels": basis.labels, "concepts": basis.vectors, "U": U, "class_mean": res.mean}
    sizes = {"n_images": args.images, "n_pfvs": len(pfvs), "n_channels": pfvs.n_channels, "n_concepts": basis.n_concepts,
             "gig_images": args.gig_images, "n_steps": args.n_steps}
    return times, cpu, results, sizes


def _worker(rank, world, port, args, folder):
    import torch.distributed as dist
    from safetensors.torch import save_file

    from captum_gig import distributed as dist_

    torch.set_num_threads(args.threads)
    dist_.LOCAL_SPLIT_ROWS = args.local_split_rows
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        times, cpu, results, sizes = run_stages(args)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in results.items()}, os.path.join(folder, f"w{world}.safetensors"))
            with open(os.path.join(folder, f"w{world}.json"), "w") as f:
                json.dump({"times": times, "cpu": cpu, "sizes": sizes}, f)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--per-image", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--solver", default="fista", help="PFVDecomposer solver (default: fista, the reference)")
    p.add_argument("--gig-images", type=int, default=32)
    p.add_argument("--n-steps", type=int, default=8)
    p.add_argument("--local-split-rows", type=int, default=256,
                   help="k-means clusters smaller than this are gathered and split locally (library default 16384)")
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--out", default=os.path.join(HERE, "results", "distributed.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.per_image, args.gig_images, args.n_steps, args.chunk_size = 16, 8, 8, 4, 32

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from captum_gig._io import atomic_write_text

    report = {"workload": vars(args).copy(), "stages": {}, "equal_to_world_1": {}, "machine": {
        "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "load_average_at_start": os.getloadavg()}}
    with tempfile.TemporaryDirectory() as folder:
        for world in args.world:
            t0 = time.perf_counter()
            mp.spawn(_worker, args=(world, _free_port(), args, folder), nprocs=world, join=True)
            with open(os.path.join(folder, f"w{world}.json")) as f:
                info = json.load(f)
            report["sizes"] = info["sizes"]
            report["stages"][str(world)] = info["times"]
            report.setdefault("cpu_busiest_rank", {})[str(world)] = info["cpu"]
            report.setdefault("wall_with_startup_s", {})[str(world)] = time.perf_counter() - t0
        base = load_file(os.path.join(folder, f"w{args.world[0]}.safetensors"))
        for world in args.world[1:]:
            other = load_file(os.path.join(folder, f"w{world}.safetensors"))
            same = {}
            for k, v in base.items():
                if v.is_floating_point():
                    scale = float(v.abs().max()) or 1.0
                    same[k] = bool(torch.allclose(other[k], v, rtol=1e-5, atol=1e-6 * scale))
                else:
                    same[k] = bool(torch.equal(other[k], v))
            report["equal_to_world_1"][str(world)] = same
    w0 = str(args.world[0])
    report["speedup"] = {w: {s: report["stages"][w0][s] / report["stages"][w][s] for s in STAGES} for w in report["stages"]}
    cpu = report["cpu_busiest_rank"]
    report["cpu_speedup"] = {w: {s: cpu[w0][s] / max(cpu[w][s], 1e-9) for s in STAGES} for w in cpu}
    report["machine"]["load_average_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")

    print(f"workload: {report['sizes']}  threads/process={args.threads}")
    worlds = list(report["stages"])
    print(f"{'stage':<20}" + "".join(f"{'W=' + w + ' wall':>12}" for w in worlds) +
          "".join(f"{'x W=' + w:>9}" for w in worlds[1:]) + "".join(f"{'W=' + w + ' CPU':>12}" for w in worlds) +
          "".join(f"{'x W=' + w:>9}" for w in worlds[1:]))
    for s in STAGES:
        row = f"{s:<20}" + "".join(f"{report['stages'][w][s]:>12.2f}" for w in worlds)
        row += "".join(f"{report['speedup'][w][s]:>9.2f}" for w in worlds[1:])
        row += "".join(f"{cpu[w][s]:>12.2f}" for w in worlds)
        row += "".join(f"{report['cpu_speedup'][w][s]:>9.2f}" for w in worlds[1:])
        print(row)
    for w, same in report["equal_to_world_1"].items():
        print(f"W={w} equals W={w0}: {all(same.values())}" + ("" if all(same.values()) else f" {same}"))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
