"""Open HTML pages in headless Chromium and fail on console errors, exceptions or failed loads.

Usage: python .ci/check_report.py REPORT_DIR/index.html [more.html ...] [--screenshot out.png]
Every page linked from the first one (relative .html links) is checked as well. The first page must
show the report's sections as rendered (not merely present in the source): each part's concepts table
with its diversity column, the concept x class heat map, class and pair graphs, the atlases and the
evaluation table with every baseline, each with its figures loaded at a visible size.
"""

import base64
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from browser import chromium, problems  # noqa: E402


#: headings every report shows, and what must be visible under them
SECTIONS = {
    "Concepts and decomposition": "table",
    "Which concepts the classes use": "img",
    "Class graphs": "img",
    "Concept atlases": "details",
    "Evaluation": "img",
}


def sections(dev):
    """Problems with the first page's sections: a heading missing, or what follows it empty or invisible."""
    found = []
    layout = dev.js("""(() => {
        const out = {};
        for (const h of document.querySelectorAll('h3')) {
            const name = h.textContent.trim();
            let el = h.nextElementSibling, seen = {table: 0, img: 0, details: 0, baselines: []};
            while (el && el.tagName !== 'H3' && el.tagName !== 'H2') {
                for (const t of ['table', 'details']) seen[t] += (el.tagName.toLowerCase() === t) + el.querySelectorAll(t).length;
                const imgs = el.tagName === 'IMG' ? [el] : Array.from(el.querySelectorAll('img'));
                seen.img += imgs.filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width >= 150).length;
                for (const th of el.querySelectorAll('th')) seen.baselines.push(th.textContent.trim());
                el = el.nextElementSibling;
            }
            (out[name] = out[name] || []).push(seen);
        }
        out.__parts = document.querySelectorAll('div.part').length;
        return out;
    })()""")
    parts = max(1, layout.pop("__parts"))
    for name, kind in SECTIONS.items():
        seen = layout.get(name, [])
        if len(seen) < parts and name != "Which concepts the classes use":
            found.append(f"section {name!r} shown {len(seen)} times for {parts} report parts")
        for s in seen:
            if s[kind] < 1:
                found.append(f"section {name!r} has no visible {kind}")
        if name == "Evaluation":
            for s in seen:
                heads = " ".join(s["baselines"])
                missing = [m for m in ("gig", "endpoint", "magnitude", "random") if m + " AUC" not in heads]
                if missing:
                    found.append(f"evaluation table lacks the columns {missing}")
    if "Pairs of similar classes" not in layout and "One image" not in layout:
        found.append("no pair or single-image graph section")
    return found


def main(argv):
    shot = None
    if "--screenshot" in argv:
        i = argv.index("--screenshot")
        shot = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    pages = [os.path.abspath(p) for p in argv]
    first = pages[0]
    with open(first, encoding="utf-8") as f:
        for href in re.findall(r"href='([^':#]+\.html)'", f.read()):
            path = os.path.normpath(os.path.join(os.path.dirname(first), href))
            if path not in pages:
                pages.append(path)
    failures = 0
    with chromium(window_size=(1300, 1000)) as dev:
        for domain in ("Page", "Runtime", "Log", "Network"):
            dev.call(f"{domain}.enable")
        for i, page in enumerate(pages):
            if not os.path.isfile(page):
                print(f"FAIL {page}: missing", file=sys.stderr)
                failures += 1
                continue
            dev.events = []
            dev.call("Page.navigate", url="file://" + page)
            dev.wait_for("Page.loadEventFired")
            time.sleep(0.5)
            dev.call("Runtime.evaluate", expression="1")  # drain late events
            found = problems(dev.events)
            n_img = dev.js("document.images.length")
            broken = dev.js("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length")
            if broken:
                found.append(f"{broken} of {n_img} images did not load")
            if i == 0:
                found += sections(dev)
            print(("FAIL " if found else "ok   ") + os.path.relpath(page, os.path.dirname(first)) + f" ({n_img} images)")
            for p in found:
                print("     " + p)
            failures += bool(found)
            if shot and i == 0:
                data = dev.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
                with open(shot, "wb") as f:
                    f.write(base64.b64decode(data))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
