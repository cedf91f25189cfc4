"""The whole GIG pipeline on ResNet50 (random weights, 224 px, the paper's 8 pre-activation layers), per stage and N.

Every stage runs through :class:`captum_gig.pipeline.Pipeline`, the code the
``captum-gig`` CLI runs, on seeded synthetic images (an ImageFolder of coloured
shapes on smooth noise, one shape kind per class, written to a temporary
folder; the images of a smaller N are a prefix of those of a larger one). The
model is ``module:benchmarks/pipeline.py:resnet50_preact``: torchvision's
``resnet50(weights=None)`` with :func:`captum_gig.expose_preactivations`, so
that ``layerX.Y.preact`` (the block's pre-ReLU sum) are hookable layers.

Each N runs in a fresh process; for each stage it records wall seconds, CPU
seconds of the process and the stage's peak resident memory (VmHWM reset
through ``/proc/self/clear_refs`` before the stage, and VmRSS sampled by a
background thread). The attribute stage is split into its class attribution
(time inside ``aggregate.class_attribution``) and its inter-layer attribution
(time inside ``aggregate.interlayer_attribution``) by wrapping those two
functions in the benchmark process; the rest of the stage is "attribute (rest)".
The graph stage's time inside ``ierf.receptive_fields`` (the atlases' probes)
is reported the same way.

attribute, graph and evaluate run on capped subsets by design
(``--attribute-images``, ``--interlayer-images``, ``--eval-images``,
``atlas_images``): their image counts do not grow with N. What still grows
with N is the number of concepts (``min(8 x channels, PFVs / 8)``) and the
PFVs searched for atlases.

Then: each stage's growth exponent (least squares of log seconds on log N)
and its projection to ``--project`` images (50,000); the same run under 2 Gloo
processes (``torchrun --nproc-per-node 2``, 1 thread each) at one N against
the single process of the sweep; and the attribute stage with the old
inter-layer schedule (``interlayer="all"``: every layer-b concept's column on
every image of the attribute subset) against the default (``"graph"``: only
the columns the graphs keep, on up to ``interlayer_images`` images per class).

    python benchmarks/pipeline.py                     # N = 256 ... 2048: ~100 min on 2 cores (to 1024: 63 min)
    python benchmarks/pipeline.py --quick             # N = 16, 32, 64, 2 layers at 112 px, under 5 min
    python benchmarks/pipeline.py --device cuda       # passes the device to Pipeline (not run: no GPU here)
    python benchmarks/pipeline.py --render results/pipeline-cpu.json [--attach-quick quick.json]  # .md/.png again

Writes ``benchmarks/results/pipeline-<device>.{json,md,png}`` (``--quick``: a
temporary folder unless ``--out`` is given) and ends with ``ratio ...`` lines.
"""

import argparse
import datetime
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: the paper's ResNet50 layers (pre-activations of these blocks)
PAPER_LAYERS = ["layer1.1", "layer2.0", "layer2.2", "layer3.0", "layer3.2", "layer3.4", "layer4.0", "layer4.2"]
STAGES = ["extract", "fit", "decompose", "attribute", "graph", "evaluate", "report"]
#: rows of the tables: the stages, with attribute split into its parts
#: the rows that add up to the total
PARTS = ["extract", "fit", "decompose", "attribute:class", "attribute:interlayer", "attribute:rest", "graph",
         "evaluate", "report"]
ROWS = ["extract", "fit", "decompose", "attribute:class", "attribute:interlayer", "attribute:rest", "attribute",
        "graph", "graph:receptive_fields", "evaluate", "report", "total"]


def resnet50_preact():
    """``torchvision.models.resnet50(weights=None)`` (seed 0) with hookable ``layerX.Y.preact`` modules."""
    import torch
    import torchvision

    from captum_gig import expose_preactivations

    state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the same random weights in every process and every run
    model = torchvision.models.resnet50(weights=None)
    torch.random.set_rng_state(state)
    expose_preactivations(model)
    return model.eval()


# ============================================================================ synthetic data


def _image(c: int, i: int, size: int, seed: int):
    """One image of class ``c``: smooth coloured noise and a few shapes of the class's kind and palette."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng([seed, c, i])
    low = rng.random((6, 6, 3)) * 0.6 + 0.2
    bg = Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    img = bg.filter(ImageFilter.GaussianBlur(size / 20))
    draw = ImageDraw.Draw(img)
    palette = np.array([[220, 40, 40], [40, 160, 60], [40, 80, 220], [230, 190, 30], [160, 60, 200],
                        [30, 190, 200], [240, 120, 30], [90, 90, 90]])
    base = palette[c % len(palette)]
    kind = c % 4
    for _ in range(int(rng.integers(2, 6))):
        col = tuple(int(v) for v in np.clip(base + rng.normal(0, 25, 3), 0, 255))
        r = float(rng.uniform(0.08, 0.22)) * size
        x, y = rng.uniform(r, size - r, 2)
        if kind == 0:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=col)
        elif kind == 1:
            draw.rectangle([x - r, y - 0.6 * r, x + r, y + 0.6 * r], fill=col)
        elif kind == 2:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=col)
        else:
            draw.line([x - r, y - r, x + r, y + r], fill=col, width=max(2, int(r / 3)))
            draw.line([x - r, y + r, x + r, y - r], fill=col, width=max(2, int(r / 3)))
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_images(root: str, n_max: int, n_classes: int, size: int, seed: int) -> None:
    """``root/all/class_<c>/<i>.png``: ``ceil(n_max / n_classes)`` images per class."""
    per = -(-n_max // n_classes)
    for c in range(n_classes):
        d = os.path.join(root, "all", f"class_{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(per):
            path = os.path.join(d, f"{i:05d}.png")
            if not os.path.isfile(path):
                _image(c, i, size, seed).save(path)


def folder_for(root: str, n: int, n_classes: int) -> str:
    """``root/n<N>``: an ImageFolder of symbolic links to the first images of each class, N in all."""
    out = os.path.join(root, f"n{n}")
    for c in range(n_classes):
        d = os.path.join(out, f"class_{c}")
        os.makedirs(d, exist_ok=True)
        k = n // n_classes + (1 if c < n % n_classes else 0)
        for i in range(k):
            link = os.path.join(d, f"{i:05d}.png")
            if not os.path.lexists(link):
                os.symlink(os.path.join(root, "all", f"class_{c}", f"{i:05d}.png"), link)
    return out


# ============================================================================ one run (a worker process)


class _Memory:
    """Peak resident memory of this process during a block: VmHWM after a reset, and VmRSS sampled."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.start_rss = self._status("VmRSS")
        self.peak = self.start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._status("VmRSS"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.end_rss = self._status("VmRSS")
        self.peak = max(self.peak, self.end_rss)
        if self.hwm_reset:
            self.peak = max(self.peak, self._status("VmHWM"))
        return False


def worker(spec_path: str) -> None:
    """Run the stages of one spec (JSON: config, out, device, threads, stages, result) and write the timings."""
    import torch

    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(int(spec["threads"]))
    from captum_gig import aggregate
    from captum_gig import distributed as dist_
    from captum_gig.pipeline import Config, Pipeline

    joined = dist_.init_from_env("gloo" if spec["device"].startswith("cpu") else None)
    current = {"stage": None}
    inner = {}  # (stage, part) -> [wall, cpu]

    def wrap(fn, part):
        def timed(*a, **kw):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                acc = inner.setdefault((current["stage"], part), [0.0, 0.0, 0])
                acc[0] += time.perf_counter() - t0
                acc[1] += time.process_time() - c0
                acc[2] += 1
        return timed

    aggregate.class_attribution = wrap(aggregate.class_attribution, "class")
    aggregate.interlayer_attribution = wrap(aggregate.interlayer_attribution, "interlayer")
    import importlib

    ierf_module = importlib.import_module("captum_gig.ierf")  # the module (the package exports a function ierf)
    ierf_module.receptive_fields = wrap(ierf_module.receptive_fields, "receptive_fields")  # the atlases' RF probes
    t_start = time.perf_counter()
    pipe = Pipeline(Config.from_dict(spec["config"]), spec["out"], device=spec["device"], quiet=not spec.get("verbose"),
                    force=bool(spec.get("force")), command=spec.get("command"))
    for name in spec.get("force_stages", []):  # recompute these even where their artifacts are up to date
        if os.path.isfile(pipe._marker(name)) and dist_.is_main_process():
            os.remove(pipe._marker(name))
    stages = {}
    for name in spec["stages"]:
        current["stage"] = name
        dist_.barrier()
        with _Memory() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            if name == "report":
                pipe.report()
            else:
                getattr(pipe, name)()
            if spec["device"].startswith("cuda"):
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        stages[name] = {"seconds": wall, "cpu_seconds": cpu, "peak_rss": mem.peak, "rss_before": mem.start_rss,
                        "rss_after": mem.end_rss, "status": pipe.timings.get(name, {}).get("status", "computed")}
        if name == "attribute":
            for part in ("class", "interlayer"):
                w, c, calls = inner.get(("attribute", part), [0.0, 0.0, 0])
                stages[f"attribute:{part}"] = {"seconds": w, "cpu_seconds": c, "calls": calls}
            stages["attribute:rest"] = {
                "seconds": wall - stages["attribute:class"]["seconds"] - stages["attribute:interlayer"]["seconds"],
                "cpu_seconds": cpu - stages["attribute:class"]["cpu_seconds"]
                - stages["attribute:interlayer"]["cpu_seconds"]}
        if name == "graph":
            w, c, calls = inner.get(("graph", "receptive_fields"), [0.0, 0.0, 0])
            stages["graph:receptive_fields"] = {"seconds": w, "cpu_seconds": c, "calls": calls}
        if dist_.is_main_process():
            print(f"    {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {mem.peak / 2**20:.0f} MiB", flush=True)
    info = {}
    if os.path.isfile(pipe.path("decomposition.json")):
        with open(pipe.path("decomposition.json")) as f:
            dec = json.load(f)
        info["layers"] = {k: {"n_pfvs": v["n_pfvs"], "n_channels": v["n_channels"], "n_concepts": v["n_concepts"],
                              "rel_l2": v["rel_l2"], "l0_ratio": v["l0_ratio"]} for k, v in dec.items()}
    info["n_images"] = len(pipe.data)
    result = {"stages": stages, "info": info, "rank": dist_.rank(), "world_size": dist_.world_size(),
              "threads": torch.get_num_threads(), "wall_in_process": time.perf_counter() - t_start,
              "ru_maxrss": _ru_maxrss()}
    path = spec["result"] + (f".rank{dist_.rank()}" if dist_.world_size() > 1 else "")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    if joined:
        dist_.leave()


def _ru_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ============================================================================ the orchestration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, folder: str, name: str, world: int = 1) -> dict:
    """Run one spec in a fresh process (``world`` > 1: under torchrun); returns the merged result."""
    spec = dict(spec, result=os.path.join(folder, f"{name}.result.json"))
    path = os.path.join(folder, f"{name}.spec.json")
    with open(path, "w") as f:
        json.dump(spec, f, indent=1)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), os.path.abspath(__file__), "--worker", path]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", path]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if world == 1:
        with open(spec["result"]) as f:
            res = json.load(f)
        res["ranks"] = [dict(res["stages"])]
    else:
        ranks = []
        for r in range(world):
            with open(f"{spec['result']}.rank{r}") as f:
                ranks.append(json.load(f))
        res = dict(ranks[0])
        merged = {}
        for stage in ranks[0]["stages"]:
            per = [rk["stages"][stage] for rk in ranks]
            merged[stage] = {"seconds": max(p["seconds"] for p in per),
                             "cpu_seconds": max(p["cpu_seconds"] for p in per)}
            if "peak_rss" in per[0]:
                merged[stage]["peak_rss"] = max(p["peak_rss"] for p in per)
                merged[stage]["peak_rss_sum"] = sum(p["peak_rss"] for p in per)
        res["stages"] = merged
        res["ranks"] = [rk["stages"] for rk in ranks]
    res["stages"]["total"] = {"seconds": sum(res["stages"][s]["seconds"] for s in STAGES if s in res["stages"]),
                              "cpu_seconds": sum(res["stages"][s]["cpu_seconds"] for s in STAGES if s in res["stages"]),
                              "peak_rss": max(res["stages"][s].get("peak_rss", 0)
                                              for s in STAGES if s in res["stages"])}
    res["process_wall_with_startup"] = wall
    res["load_average"] = {"before": load0, "after": os.getloadavg()}
    res["command"] = cmd
    return res


def fit_power(ns, secs):
    """``(a, b)`` of ``seconds = a * N^b`` by least squares in log-log (None when fewer than 2 positive points)."""
    pts = [(math.log(n), math.log(s)) for n, s in zip(ns, secs) if s and s > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    b = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return math.exp(my - b * mx), b


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="N, images (default 256 512 1024 2048; --quick: 16 32 64)")
    p.add_argument("--quick", action="store_true", help="small sizes and subsets: a few minutes on 2 CPU cores")
    p.add_argument("--device", default="cpu", help="torch device given to Pipeline (cpu, cuda)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads of the single process (default 1: on a shared 2-core machine, 2 threads "
                        "stall whenever another job holds a core; the 2-process run has 1 thread per process)")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default 224; quick 112)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="default: the paper's 8 (quick: its last 2), as <block> or <block>.preact")
    p.add_argument("--classes", type=int, default=4, help="class folders of the synthetic data")
    p.add_argument("--per-image", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--attribute-images", type=int, default=None, help="class-GIG subset (default 16; quick 8)")
    p.add_argument("--interlayer-images", type=int, default=None,
                   help="inter-layer GIG images per class (default 4; quick 2)")
    p.add_argument("--eval-images", type=int, default=None, help="evaluation subset (default 8; quick 4)")
    p.add_argument("--n-steps", type=int, default=None, help="GIG path points (default 4; quick 2)")
    p.add_argument("--eval-steps", type=int, default=None, help="deletion / insertion points (default 5; quick 3)")
    p.add_argument("--atlas-images", type=int, default=2000, help="images searched for atlas crops (library default)")
    p.add_argument("--atlas-top", type=int, default=None,
                   help="crops per atlas concept (library default 6; here 2, quick 1)")
    p.add_argument("--ierf", default="ixg",
                   help="iERF method of the atlas crops (library default ig, 8 steps per crop)")
    p.add_argument("--dist-n", type=int, default=None,
                   help="N of the 2-process run (default: the smallest size; 0: skip)")
    p.add_argument("--world", type=int, default=2, help="processes of the distributed run")
    p.add_argument("--compare-n", type=int, default=None,
                   help="N of the interlayer=all vs graph comparison (default 128; quick 16; 0: skip)")
    p.add_argument("--compare-layers", nargs="+", default=None,
                   help="layers of that comparison (default: the paper's first 3, quick the 2 of the run)")
    p.add_argument("--compare-attribute-images", type=int, default=None,
                   help="its attribute subset (default 4; quick 2)")
    p.add_argument("--compare-n-steps", type=int, default=None, help="its path points (default 4; quick 2)")
    p.add_argument("--compare-repeats", type=int, default=None,
                   help="attribute runs of each kind, alternating; the fastest counts (default 2; quick 1)")
    p.add_argument("--concepts", type=int, default=None,
                   help="concepts per layer, fixed over N so that the exponents measure the data's growth "
                        "(default 1024; quick 32; 0: the library's min(8 x channels, PFVs / 8), which grows with N)")
    p.add_argument("--k-sweep", type=int, nargs="*", default=None,
                   help="concept counts of the fit + decompose sweep at the smallest N (default 256 512 1024; "
                        "quick 8 16 32; none: skip)")
    p.add_argument("--reuse-comparison", metavar="JSON",
                   help="take the interlayer all-vs-graph comparison from an earlier results JSON instead of rerunning "
                        "it (the inter-layer code it measures must be unchanged since)")
    p.add_argument("--project", type=int, default=50000, help="N of the projection")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="folder for images and pipeline outputs (default: a temporary one)")
    p.add_argument("--out", default=None,
                   help="result prefix (default benchmarks/results/pipeline-<device>; quick: temp)")
    p.add_argument("--verbose", action="store_true", help="the pipeline's own log lines")
    p.add_argument("--render", metavar="JSON", help="write the .md and .png (and print the summary) of a results JSON")
    p.add_argument("--attach-quick", metavar="JSON", help="with --render: add a --quick run's results to it")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.render:
        with open(args.render) as f:
            report = json.load(f)
        saved = report.get("args", {})
        args.out = args.out or os.path.splitext(os.path.abspath(args.render))[0]
        args.classes = saved.get("classes", args.classes)
        args.device = report["machine"].get("device", args.device)
        if args.attach_quick:
            with open(args.attach_quick) as f:
                report["quick"] = json.load(f)
        done = [n for n in report["sizes"] if str(n) in report["runs"]]
        return write_outputs(report, args, final=len(done) == len(report["sizes"]))
    if args.quick:
        defaults = dict(sizes=[16, 32, 64], layers=PAPER_LAYERS[-2:], image_size=112, attribute_images=8,
                        interlayer_images=2, eval_images=4, n_steps=2, eval_steps=3, atlas_top=1, compare_n=16,
                        compare_n_steps=2, compare_attribute_images=2, compare_layers=PAPER_LAYERS[-2:],
                        compare_repeats=1, concepts=32, k_sweep=[8, 16, 32])
    else:
        defaults = dict(sizes=[256, 512, 1024, 2048], layers=PAPER_LAYERS, image_size=224, attribute_images=16,
                        interlayer_images=4, eval_images=8, n_steps=4, eval_steps=5, atlas_top=2, compare_n=128,
                        compare_n_steps=4, compare_attribute_images=4, compare_layers=PAPER_LAYERS[:3],
                        compare_repeats=2, concepts=1024, k_sweep=[256, 512, 1024])
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.dist_n is None:
        args.dist_n = min(args.sizes)
    layers = [f"{l}.preact" if not l.endswith(".preact") else l for l in args.layers]
    compare_layers = [f"{l}.preact" if not l.endswith(".preact") else l for l in args.compare_layers]
    if args.out is None:
        args.out = (os.path.join(tempfile.gettempdir(), f"captum-gig-pipeline-quick-{args.device.split(':')[0]}")
                    if args.quick else os.path.join(HERE, "results", f"pipeline-{args.device.split(':')[0]}"))
    command = " ".join(["python benchmarks/pipeline.py"] + list(sys.argv[1:] if argv is None else argv))

    import torch

    t_all = time.perf_counter()
    own_work = args.work is None
    work = args.work or tempfile.mkdtemp(prefix="captum-gig-pipeline-")
    os.makedirs(work, exist_ok=True)
    print(f"writing {max(args.sizes + [args.dist_n, args.compare_n])} synthetic images ({args.classes} classes) "
          f"under {work}", flush=True)
    t0 = time.perf_counter()
    write_images(os.path.join(work, "images"), max(args.sizes + [args.dist_n, args.compare_n]), args.classes,
                 max(224, args.image_size), args.seed)
    print(f"  {time.perf_counter() - t0:.1f} s", flush=True)

    model_spec = f"module:{os.path.abspath(__file__)}:resnet50_preact"
    base = dict(model=model_spec, weights="none", image_size=args.image_size, normalize="imagenet", layers=layers,
                by="label",
                seed=args.seed, per_image=args.per_image, batch_size=args.batch_size,
                attribute_images=args.attribute_images, interlayer_images=args.interlayer_images,
                eval_images=args.eval_images, n_steps=args.n_steps, eval_steps=args.eval_steps,
                atlas_images=args.atlas_images, atlas_top=args.atlas_top, ierf=args.ierf,
                concepts=args.concepts or None)
    settings_shown = {k: base[k] for k in ("image_size", "by", "per_image", "batch_size", "attribute_images",
                                           "interlayer_images",
                                           "eval_images", "n_steps", "eval_steps", "atlas_images", "atlas_top",
                                           "ierf", "concepts")}
    from captum_gig.pipeline import DEFAULTS

    settings_shown.update({k: DEFAULTS[k] for k in ("interlayer", "class_layers", "eval_pairs", "eval_targets",
                                                    "eval_seeds", "baselines", "top_k", "concept_factor",
                                                    "min_members", "alpha", "extractor", "sampling", "graph")})

    def spec_for(n, threads, stages=STAGES, **changes):
        return {"config": dict(base, data=folder_for(os.path.join(work, "images"), n, args.classes), **changes),
                "out": os.path.join(work, "runs", f"n{n}-" + "-".join(f"{k}{v}" for k, v in changes.items()
                                                                       if k != "layers") + f"w{threads}"),
                "device": args.device, "threads": threads, "stages": list(stages), "verbose": args.verbose,
                "command": ["benchmarks/pipeline.py"], "force": True}

    report = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__,
                          "python": platform.python_version(), "threads_single_process": args.threads,
                          "device": args.device, "load_average_at_start": os.getloadavg()},
              "model": f"torchvision resnet50(weights=None), seed 0, expose_preactivations; {args.image_size} px",
              "layers": layers, "settings": settings_shown, "sizes": args.sizes, "runs": {},
              "args": {k: v for k, v in vars(args).items() if k not in ("worker", "render")}}
    folder = os.path.join(work, "specs")
    os.makedirs(folder, exist_ok=True)

    def summarize(final):
        """Fits, projection and dominant stage over the sizes done so far; writes the outputs."""
        ns = [int(n) for n in args.sizes if str(n) in report["runs"]]
        report["sizes_done"] = ns
        fits = {}
        for row in ROWS:
            secs = [report["runs"][str(n)]["stages"].get(row, {}).get("seconds") for n in ns]
            f = fit_power(ns, secs)
            if f:
                a, b = f
                fits[row] = {"a": a, "exponent": b, "projected_seconds": a * args.project ** b}
            rss = [report["runs"][str(n)]["stages"].get(row, {}).get("peak_rss") for n in ns]
            if rss and all(rss):
                fr = fit_power(ns, rss)
                if fr:
                    fits.setdefault(row, {})["rss_exponent"] = fr[1]
                    fits[row]["projected_peak_rss"] = fr[0] * args.project ** fr[1]
        report["fits"] = fits
        report["project"] = args.project
        candidates = [r for r in fits if r not in ("total", "attribute") and "projected_seconds" in fits[r]]
        report["dominant_stage"] = max(candidates, key=lambda r: fits[r]["projected_seconds"]) if candidates else None
        ks = report.get("k_sweep")
        if ks and args.concepts and all(st in ks["exponent"] and st in fits for st in ("fit", "decompose")):
            n0 = min(ns)
            info = report["runs"][str(n0)].get("info", {}).get("layers", {})
            paper_k = [8 * v["n_channels"] for v in info.values()]
            out = {"ks": paper_k, "k0": args.concepts, "n0": n0}
            for st in ("fit", "decompose"):
                t0 = report["runs"][str(n0)]["stages"][st]["seconds"]
                scale = (args.project / n0) ** fits[st]["exponent"]
                per_layer = t0 / max(len(paper_k), 1)  # equal shares: the measured K is the same in every layer
                total = sum(per_layer * scale * (k / args.concepts) ** ks["exponent"][st] for k in paper_k)
                out[f"{st}_hours"] = total / 3600
            report["paper_k_projection"] = out
        report["machine"]["load_average_at_end"] = os.getloadavg()
        report["wall_seconds"] = time.perf_counter() - t_all
        write_outputs(report, args, final=final)

    def sweep(n):
        print(f"N = {n} (1 process, {args.threads} thread(s))", flush=True)
        res = launch(spec_for(n, args.threads), folder, f"n{n}")
        report["runs"][str(n)] = res
        print(f"  total {res['stages']['total']['seconds']:.1f} s ({time.perf_counter() - t_all:.0f} s so far)",
              flush=True)

    def distributed():
        n = args.dist_n
        one = report["runs"].get(str(n)) or report.setdefault("extra_runs", {}).get(str(n))
        if one is None:
            print(f"N = {n} (1 process, {args.threads} threads) for the distributed comparison", flush=True)
            one = report["extra_runs"][str(n)] = launch(spec_for(n, args.threads), folder, f"n{n}")
        print(f"N = {n} ({args.world} processes, Gloo, 1 thread each)", flush=True)
        res = launch(spec_for(n, 1), folder, f"n{n}-w{args.world}", world=args.world)
        one = one["stages"]
        report["distributed"] = {
            "n": n, "world": args.world, "threads_per_process": 1, "single_process_threads": args.threads,
            "single": one, "result": res,
            "ratio": {s: one[s]["seconds"] / res["stages"][s]["seconds"] for s in ROWS
                      if s in res["stages"] and res["stages"][s]["seconds"] > 0},
            "cpu_ratio": {s: one[s]["cpu_seconds"] / res["stages"][s]["cpu_seconds"] for s in ROWS
                          if s in res["stages"] and res["stages"][s]["cpu_seconds"] > 0}}

    def compare():
        n = args.compare_n
        cmp_settings = dict(layers=compare_layers, attribute_images=args.compare_attribute_images,
                            n_steps=args.compare_n_steps)  # the library's concept count, as when first measured
        cmp_settings["concepts"] = None
        print(f"N = {n}: attribute with interlayer='graph' (default) and 'all' (the old way), layers {compare_layers}, "
              f"{args.compare_repeats} runs each, alternating", flush=True)
        prep = spec_for(n, args.threads, ["extract", "fit", "decompose"], **cmp_settings)
        prepared = launch(prep, folder, f"cmp{n}-prep")
        runs = {"graph": [], "all": []}
        for r in range(args.compare_repeats):
            for mode in ("graph", "all"):
                sp = spec_for(n, args.threads, ["attribute"], **cmp_settings, interlayer=mode)
                sp["out"], sp["force"] = prep["out"], False  # extract .. decompose resumed; attribute recomputed
                sp["force_stages"] = ["attribute"]
                runs[mode].append(launch(sp, folder, f"cmp{n}-{mode}-{r}"))

        def best(mode, row):
            return min(x["stages"][row]["seconds"] for x in runs[mode])

        rows = ("attribute", "attribute:interlayer", "attribute:class")
        report["interlayer_comparison"] = {
            "n": n, "layers": compare_layers, "settings": dict(cmp_settings, interlayer_images=args.interlayer_images),
            "repeats": args.compare_repeats, "prepared": prepared["info"],
            "solver": "the pipeline's decomposer with the `solver` setting's default, 'auto', in both",
            "after": {row: best("graph", row) for row in rows}, "before": {row: best("all", row) for row in rows},
            "after_runs": runs["graph"], "before_runs": runs["all"]}
        c = report["interlayer_comparison"]
        c["ratio"] = {row: c["before"][row] / c["after"][row] for row in rows[:2] if c["after"][row] > 0}

    def k_sweep():
        n = min(args.sizes)
        base_out = spec_for(n, args.threads)["out"]  # the sweep's run at this N: its PFVs are reused
        rows = {}
        print(f"N = {n}: fit + decompose with K = {args.k_sweep} concepts per layer", flush=True)
        for k in args.k_sweep:
            sp = spec_for(n, args.threads, ["extract", "fit", "decompose"], concepts=k)
            sp["out"], sp["force"], sp["force_stages"] = base_out, False, ["fit", "decompose"]
            rows[str(k)] = launch(sp, folder, f"k{k}-n{n}")["stages"]
        ks = [int(k) for k in rows]
        fits = {st: fit_power(ks, [rows[str(k)][st]["seconds"] for k in ks]) for st in ("fit", "decompose")}
        report["k_sweep"] = {"n": n, "ks": ks, "runs": rows,
                             "exponent": {st: f[1] for st, f in fits.items() if f}}
        if args.concepts and args.concepts not in ks:
            print("  note: --concepts is not in --k-sweep; the paper-K projection uses the nearest K", flush=True)

    if args.reuse_comparison:
        with open(args.reuse_comparison) as f:
            old = json.load(f)
        report["interlayer_comparison"] = dict(old["interlayer_comparison"], reused_from={
            "file": os.path.relpath(os.path.abspath(args.reuse_comparison), ROOT), "date": old.get("date"),
            "command": old.get("command")})
        report["interlayer_comparison"]["solver"] = "the pipeline's decomposer, solver 'auto', in both"
    # the smallest size, then the 2-process run and the comparison (cheap), then the larger sizes
    todo = [("sweep", n) for n in args.sizes[:1]]
    todo += [("k_sweep", None)] if args.k_sweep else []
    todo += [("distributed", None)] if args.dist_n else []
    todo += [("compare", None)] if args.compare_n and not args.reuse_comparison else []
    todo += [("sweep", n) for n in args.sizes[1:]]
    for i, (what, n) in enumerate(todo):
        {"sweep": lambda: sweep(n), "k_sweep": k_sweep, "distributed": distributed, "compare": compare}[what]()
        summarize(final=i == len(todo) - 1)
    if own_work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


# ============================================================================ outputs


def _secs(entry):
    return f"{entry['seconds']:.1f}" if entry else "-"


def _mib(b):
    return f"{b / 2**20:.0f}" if b else "-"


def _label(row):
    return {"attribute:class": "attribute: class GIG", "attribute:interlayer": "attribute: inter-layer GIG",
            "attribute:rest": "attribute: rest", "attribute": "attribute (all)",
            "graph:receptive_fields": "graph: of which receptive-field probes"}.get(row, row)


def write_outputs(report, args, final=True):
    from captum_gig._io import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out + ".json", json.dumps(report, indent=1, default=str) + "\n")
    ns = [str(n) for n in report["sizes_done"]]
    runs, fits, s = report["runs"], report["fits"], report["settings"]
    if not ns:
        return
    projected_sum = sum(fits[r]["projected_seconds"] for r in PARTS if "projected_seconds" in fits.get(r, {}))
    m = report["machine"]
    L = [f"# The whole pipeline, per stage (ResNet50, {len(report['layers'])} layers, {args.device})", "",
         f"`{report['command'].strip()}` ({report['date']}, {report['wall_seconds'] / 60:.1f} min in all)", "",
         f"Machine: {m['nproc']} CPUs ({m['cpu']}), torch {m['torch']}, python {m['python']}; the single process "
         f"runs {m['threads_single_process']} intra-op thread(s); load average {m['load_average_at_start'][0]:.2f} at "
         f"the start, {m['load_average_at_end'][0]:.2f} at the end (a shared machine: CPU seconds are in the "
         "JSON).", "",
         f"Model: {report['model']}. Layers: {', '.join(report['layers'])}. Data: seeded synthetic ImageFolder "
         f"({args.classes} classes of coloured shapes on smooth noise), classes by label.", "",
         "Capped subsets (explicit settings): " + ", ".join(f"`{k}={v}`" for k, v in s.items()) + ".", "",
         "attribute, graph and evaluate work on capped subsets by design: `attribute_images` for the class GIG, "
         "`interlayer_images` per class for the inter-layer GIG, `eval_images` for evaluation, the first "
         "`atlas_images` images for atlas crops. Their image counts do **not** grow with N; what grows is "
         + (f"the PFVs searched for atlas crops (the concept count is fixed at `concepts={s['concepts']}` per layer, "
            "so that every exponent measures growth with the data; the cost of more concepts is measured "
            "separately below)" if s.get("concepts") else
            "the number of concepts per layer (min(8 x channels, PFVs / 8)) and the PFVs searched for atlas crops")
         + ". Their exponents below describe that, not a per-image cost.", "",
         "## Seconds per stage (wall, 1 process)", "",
         "| stage | " + " | ".join(f"N={n}" for n in ns) + f" | exponent | projected s at N={report['project']:,} |",
         "|---|" + "---|" * (len(ns) + 2)]
    for row in ROWS:
        f = fits.get(row, {})
        L.append(f"| {_label(row)} | " + " | ".join(_secs(runs[n]['stages'].get(row)) for n in ns)
                 + f" | {f.get('exponent', float('nan')):.2f} | "
                 + (f"{projected_sum:,.0f} (sum of the stages)" if row == "total"
                    else f"{f.get('projected_seconds', float('nan')):,.0f}") + " |")
    L += ["", "## Peak resident memory per stage (MiB, 1 process)", "",
          "| stage | " + " | ".join(f"N={n}" for n in ns) + f" | exponent | projected MiB at N={report['project']:,} |",
          "|---|" + "---|" * (len(ns) + 2)]
    for row in STAGES + ["total"]:
        f = fits.get(row, {})
        L.append(f"| {row} | " + " | ".join(_mib(runs[n]['stages'][row].get('peak_rss')) for n in ns)
                 + f" | {f.get('rss_exponent', float('nan')):.2f} | {_mib(f.get('projected_peak_rss'))} |")
    L += ["", "Peak RSS of a stage: VmHWM of the process reset before the stage (and VmRSS sampled every 20 ms); it "
          "includes what earlier stages left in memory (the model, the data index).", ""]
    info = runs[ns[-1]].get("info", {}).get("layers", {})
    if info:
        L += [f"Sizes at N={ns[-1]}: " + "; ".join(f"{k}: {v['n_pfvs']} PFVs x {v['n_channels']} ch, {v['n_concepts']} "
                                                   f"concepts" for k, v in info.items()) + ".", ""]
    dom = report["dominant_stage"]
    if dom:
        why = (f"at the fixed `concepts={s['concepts']}`" if s.get("concepts") else
               "; the concept count stops growing at 8 x channels (from N = 8 x channels images with per_image=8 "
               "and min_members=8), which such a fit does not know")
        L += [f"**Dominant stage at N={report['project']:,}: {_label(dom)}**, projected "
              f"{fits[dom]['projected_seconds'] / 3600:.1f} h (exponent {fits[dom]['exponent']:.2f}); the stages' "
              f"projections sum to {projected_sum / 3600:.1f} h. Projections extrapolate a power law "
              f"fitted on N={ns[0]}..{ns[-1]} {why}.", ""]
    ks = report.get("k_sweep")
    if ks:
        kk = [str(k) for k in ks["ks"]]
        L += [f"## Fit and decompose against the concept count K (N={ks['n']}, every layer the same K)", "",
              "| stage | " + " | ".join(f"K={k}" for k in kk) + " | exponent in K |", "|---|" + "---|" * (len(kk) + 1)]
        for st in ("fit", "decompose"):
            L.append(f"| {st} | " + " | ".join(f"{ks['runs'][k][st]['seconds']:.1f}" for k in kk)
                     + f" | {ks['exponent'].get(st, float('nan')):.2f} |")
        paper = report.get("paper_k_projection")
        if paper:
            L += ["", f"**The paper's K = 8 x channels** ({', '.join(f'{k}' for k in paper['ks'])} for the {len(paper['ks'])} layers) "
                  f"at N={report['project']:,}: decompose projected {paper['decompose_hours']:.1f} h, fit "
                  f"{paper['fit_hours']:.1f} h: each layer's share of the measured N={paper['n0']} seconds at "
                  f"K={paper['k0']}, scaled by (N / {paper['n0']})^e_N and (K / {paper['k0']})^e_K with the "
                  "exponents above (a projection, not a run)."]
        L.append("")
    d = report.get("distributed")
    if d:
        r2 = d["result"]["stages"]
        one = d["single"]
        L += [f"## {d['world']} processes (Gloo, torchrun) at N={d['n']}", "",
              f"Single process: {d['single_process_threads']} intra-op thread(s) (the N={d['n']} run of the sweep); "
              f"each of the {d['world']} processes: 1 thread. Ratio = 1-process seconds / {d['world']}-process "
              "seconds (slowest rank).", "",
              f"| stage | 1 process (s) | {d['world']} processes (s) | ratio | CPU ratio (busiest rank) |",
              "|---|---|---|---|---|"]
        for row in ROWS:
            if row in r2 and row in one:
                L.append(f"| {_label(row)} | {one[row]['seconds']:.1f} | {r2[row]['seconds']:.1f} | "
                         f"{d['ratio'].get(row, float('nan')):.2f} | {d['cpu_ratio'].get(row, float('nan')):.2f} |")
        L.append("")
    c = report.get("interlayer_comparison")
    if c:
        L += [f"## Inter-layer attribution: interlayer='all' (before) vs 'graph' (after), N={c['n']}", "",
              f"Layers {', '.join(c['layers'])}; settings " + ", ".join(f"`{k}={v}`" for k, v in c["settings"].items())
              + f". Solver: {c['solver']}. 'all' computes every layer-b concept's column (through the "
              "channel-linearity matrix) on every image of the attribute subset; 'graph' only the columns the "
              "graphs keep, on up to "
              "`interlayer_images` images per class of the graphs.", "",
              "| part | before: all (s) | after: graph (s) | ratio |", "|---|---|---|---|"]
        for row in ("attribute:interlayer", "attribute:class", "attribute"):
            L.append(f"| {_label(row)} | {c['before'][row]:.1f} | {c['after'][row]:.1f} | "
                     f"{c['before'][row] / c['after'][row] if c['after'][row] else float('nan'):.1f} |")
        sizes = c.get("prepared", {}).get("layers", {})
        L += ["", f"Fastest of {c['repeats']} runs of each, alternating, each in a fresh process resuming extract .. "
              "decompose. 'all' needs min(K_b, C_b) backward directions per image and path point (concepts, channels "
              "of layer b): " + "; ".join(f"{k}: K={v['n_concepts']}, C={v['n_channels']}" for k, v in sizes.items())
              + (". With the library's default concept count K grows with N up to 8 x C, so the old way's cost grows "
                 "with N where the graph's does not." if not c["settings"].get("concepts") else ".")]
        if c.get("reused_from"):
            r = c["reused_from"]
            L += ["", f"Reused from `{r['file']}` ({r['date']}, `{r['command']}`): the inter-layer attribution "
                  "it measures is unchanged since."]
        L += ["", f"Command: part of the run above (`{report['command'].strip()}`, settings `--compare-n {c['n']}` "
              f"`--compare-layers {' '.join(c['layers'])}` "
              f"`--compare-attribute-images {c['settings']['attribute_images']}` "
              f"`--compare-n-steps {c['settings']['n_steps']}`).", ""]
    q = report.get("quick")
    if q:
        qn = [str(n) for n in q["sizes_done"]]
        L += [f"## Quick mode (`{q['command']}`)", "",
              f"{q['wall_seconds']:.0f} s in all ({q['date']}), on {q['model'].split(';')[-1].strip()}, layers "
              f"{', '.join(q['layers'])}; settings " + ", ".join(f"`{k}={v}`" for k, v in q["settings"].items()
                                                              if k in ("attribute_images", "interlayer_images",
                                                                       "eval_images", "n_steps", "eval_steps",
                                                                       "atlas_top")) + ". Seconds per stage:", "",
              "| stage | " + " | ".join(f"N={n}" for n in qn) + " |", "|---|" + "---|" * len(qn)]
        for row in PARTS + ["total"]:
            L.append(f"| {_label(row)} | " + " | ".join(_secs(q["runs"][n]["stages"].get(row)) for n in qn) + " |")
        L.append("")
    if not final:
        L += [f"**Partial**: sizes done {ns} of {report['sizes']} (the remaining sizes did not run: stopped, or "
              "still running).", ""]
    L += [f"![seconds per stage]({os.path.basename(args.out)}.png)", ""]
    atomic_write_text(args.out + ".md", "\n".join(L) + "\n")
    plot(report, args.out + ".png")
    if not final:
        print(f"  partial results ({ns}) written to {args.out}.json, .md, .png", flush=True)
        return
    print("\n".join(L[L.index("## Seconds per stage (wall, 1 process)"):]))
    if dom:
        print(f"dominant {dom} {fits[dom]['projected_seconds']:.4g}")
    for row in ROWS:
        if "exponent" in fits.get(row, {}):
            print(f"exponent {row} {fits[row]['exponent']:.3f}")
    if d:
        for row, v in d["ratio"].items():
            print(f"ratio dist_w{d['world']}_{row} {v:.4g}")
    if c:
        for row, v in c["ratio"].items():
            print(f"ratio interlayer_all_over_graph_{row} {v:.4g}")
    print(f"written to {args.out}.json, .md, .png")


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [int(n) for n in report["sizes_done"]]
    fig, ax = plt.subplots(figsize=(10, 5))
    for row in ROWS:
        if row == "attribute":
            continue
        pts = [(n, report["runs"][str(n)]["stages"][row]["seconds"]) for n in ns
               if row in report["runs"][str(n)]["stages"]]
        if not any(x > 0 for _, x in pts):
            continue
        f = report["fits"].get(row, {})
        style = dict(lw=2.4, color="k") if row == "total" else {}
        label = _label(row) + (f" (N^{f['exponent']:.2f})" if "exponent" in f else "")
        ax.plot([n for n, _ in pts], [max(x, 1e-3) for _, x in pts], "x--" if row == "graph:receptive_fields" else "o-",
                label=label, **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(ns, [str(n) for n in ns])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("N, images")
    ax.set_ylabel("wall seconds")
    ax.set_title(f"captum_gig pipeline, ResNet50, {len(report['layers'])} layers, "
                 f"{report['machine']['nproc']} CPUs ({report['machine']['device']})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
